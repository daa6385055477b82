# Copyright 2026 The trl_arcopo contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Pretrain the tiny streaming generator of the Moving Shapes world (pixel space; with `--pack_frames`, each 3-frame
chunk packed into the channels of one latent frame by a `FramePackingAutoencoder`).

    python examples/moving_shapes/pretrain.py --pack_frames --output_dir outputs/moving-shapes-pretrain

The exact commands of the shipped model are in docs/moving_shapes.md.

Causal flow matching with teacher forcing: every training video is laid out as `[noisy chunks ; clean chunks]` and run
once with the teacher-forcing mask, so each noisy chunk is predicted from the clean chunks before it, exactly as the
streaming sampler will see it. Each chunk gets its own noise level, drawn from the levels the 4-step sampler visits
(Self-Forcing's step list without the shift-5 warp: `sigma in {1, 0.75, 0.5, 0.25}`), mixed with uniform levels.
Prompts cover all 72 combinations. With `--degrade_context`, part of the context is the model's own estimate of the
true chunks instead of the chunks themselves, so that continuing an imperfect, generated past is trained too.

The run resumes from `output_dir/checkpoint.pt` (written atomically every `--checkpoint_every` steps), evaluates the
EMA weights on all 72 prompts with the real sampler every `--eval_every` steps (accuracy of colour, shape, direction
and all three, written to `output_dir/metrics.csv`), and saves the EMA model as a `SelfForcingPipeline` folder in
`output_dir/pipeline` at every evaluation.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import shutil
import time

import torch
from tqdm.auto import tqdm

from trl_arcopo import SelfForcingPipeline
from trl_arcopo.models import FramePackingAutoencoder
from trl_arcopo.sampling import get_schedule, self_forcing_scheduler
from trl_arcopo.shapes import (
    ALL_PROMPTS,
    CausalWanX0Transformer3DModel,
    render_batch,
    score_videos,
    shapes_text_encoder,
    shapes_tokenizer,
    teacher_forcing_mask,
)


FRAMES, CHUNK, SIZE, PATCH = 12, 3, 32, 4
TEXT_TOKENS = 8
# Self-Forcing's step list [1000, 750, 500, 250] without the shift-5 warp: sigmas [1, 0.75, 0.5, 0.25]. A model trained
# by plain flow matching (not distilled like Self-Forcing) returns the posterior mean x0 at each step, which is blurry
# from the warped schedule's last state (sigma 0.625); the last state at sigma 0.25 keeps objects sharp.
SHIFT = 1.0
# The shipped pipeline samples with 8 uniform ODE steps (about twice the all-correct rate of the 4 training levels).
SAMPLING_SIGMAS = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def build_pipeline(
    seed: int,
    pack_frames: bool = False,
    width: int = 128,
    ffn_dim: int = 512,
    layers: int = 4,
) -> SelfForcingPipeline:
    """
    The untrained pipeline; with `pack_frames`, a `FramePackingAutoencoder` makes every chunk one latent frame.
    """
    vae = FramePackingAutoencoder(in_channels=3, scale_factor_temporal=CHUNK) if pack_frames else None
    channels = 3 * CHUNK if pack_frames else 3
    tokenizer, text_encoder = shapes_tokenizer(), shapes_text_encoder(seed)
    transformer = CausalWanX0Transformer3DModel(  # the head predicts x0 (see its docstring)
        patch_size=(1, PATCH, PATCH),
        num_attention_heads=width // 32,
        attention_head_dim=32,
        in_channels=channels,
        out_channels=channels,
        text_dim=64,
        freq_dim=64,
        ffn_dim=ffn_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    pipe = SelfForcingPipeline(
        tokenizer,
        text_encoder,
        transformer,
        self_forcing_scheduler(shift=SHIFT),
        vae,
        default_height=SIZE,
        default_width=SIZE,
        default_num_frames=FRAMES,
        default_max_sequence_length=TEXT_TOKENS,
        default_sampler="ode",
        default_sigmas=SAMPLING_SIGMAS,
        default_num_frames_per_chunk=1 if pack_frames else CHUNK,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def degraded_context(
    model: torch.nn.Module,
    x0: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    frame_indices: torch.Tensor,
    clean_frames: int,
    generator: torch.Generator,
    levels: tuple[float, float],
    chunk: int = CHUNK,
) -> torch.Tensor:
    """
    The model's own clean estimates `[B, C, F', H, W]` of the first `clean_frames` frames of `x0` `[B, C, F, H, W]`:
    each chunk is noised to a level uniform in `levels` and denoised in one step given the true chunks before it.
    Used as context in place of the true chunks, they teach the next chunk to continue the *generated* past (blurred
    edges, slightly wrong shapes) rather than only the perfect one the sampler never shows it.
    """
    batch, num_chunks = x0.shape[0], x0.shape[2] // chunk
    sigma = torch.rand((batch, num_chunks), generator=generator) * (levels[1] - levels[0]) + levels[0]  # [B, L]
    s = sigma.repeat_interleave(chunk, dim=1)[:, None, :, None, None]  # [B, 1, F, 1, 1]
    x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=generator)  # [B, C, F, H, W]
    timesteps = torch.cat([s[:, 0, :, 0, 0] * 1000, torch.zeros_like(s[:, 0, :clean_frames, 0, 0])], dim=1)
    with torch.no_grad():
        velocity = model(
            torch.cat([x_t, x0[:, :, :clean_frames]], dim=2), timesteps, embeds, attention_mask=mask,
            frame_indices=frame_indices, return_dict=False,
        )[0][:, :, :clean_frames]  # fmt: skip
    return (x_t[:, :, :clean_frames] - s[:, :, :clean_frames] * velocity).clamp(-1, 1)


def sample_sigmas(
    batch: int, num_chunks: int, generator: torch.Generator, uniform_fraction: float, levels: torch.Tensor
) -> torch.Tensor:
    """Per-chunk noise levels `[B, L]`: the sampler's `levels`, or (with probability `uniform_fraction`) uniform."""
    pick = levels[torch.randint(len(levels), (batch, num_chunks), generator=generator)]  # [B, L]
    uniform = torch.rand((batch, num_chunks), generator=generator) * 0.95 + 0.05  # [B, L]
    use_uniform = torch.rand((batch, num_chunks), generator=generator) < uniform_fraction  # [B, L]
    return torch.where(use_uniform, uniform, pick)


def loss_weights(x0: torch.Tensor, object_weight: float, margin: int) -> torch.Tensor:
    """
    Per-pixel loss weights `[B, 1, F, H, W]` of videos `x0` `[B, C, F, H, W]` in `[-1, 1]`: 1, plus `object_weight`
    on the object grown by `margin` pixels. The object covers about 10 % of a frame and its shape only a few pixels
    of it, so plain MSE learns shape slowly; weighting the object alone biases every uncertain pixel towards its
    colour, while the grown region also weights the black pixels around it (where a circle differs from a square).
    """
    mask = (x0 > -0.9).any(dim=1, keepdim=True).float()  # [B, 1, F, H, W]
    if margin > 0:
        batch, _, frames, height, width = mask.shape
        flat = mask.transpose(1, 2).reshape(batch * frames, 1, height, width)  # [B * F, 1, H, W]
        grown = torch.nn.functional.max_pool2d(flat, 2 * margin + 1, stride=1, padding=margin)
        mask = grown.view(batch, frames, 1, height, width).transpose(1, 2)  # [B, 1, F, H, W]
    return 1 + object_weight * mask


@torch.no_grad()
def evaluate(pipe: SelfForcingPipeline, seed: int, sampler: str) -> dict[str, float]:
    prompts = list(ALL_PROMPTS)
    generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
    videos = pipe(prompts, generator=generators, output_type="pt", sampler=sampler).frames  # [72, F, C, H, W]
    scores = score_videos(prompts, videos)
    return {k: v.float().mean().item() for k, v in scores.items()}


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/moving-shapes-pretrain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--first_chunk_batch_size",
        type=int,
        default=32,
        help="Extra videos per step trained on their first chunk only (no context): the chunk that decides colour, "
        "shape, position and direction, and the cheapest one (3 frames).",
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--max_minutes", type=float, default=110.0, help="Stop (and save) after this wall time.")
    parser.add_argument(
        "--stop_at_step",
        type=int,
        default=None,
        help="Stop (and save) at this step, keeping the learning-rate schedule of `--max_steps`.",
    )
    parser.add_argument("--ema_decay", type=float, default=0.995)
    parser.add_argument("--uniform_fraction", type=float, default=0.25)
    parser.add_argument(
        "--object_weight",
        type=float,
        default=0.0,
        help="Extra loss weight on object pixels (0: plain MSE; 10 was too much, see docs/moving_shapes.md).",
    )
    parser.add_argument(
        "--object_margin",
        type=int,
        default=0,
        help="Grow the weighted region of `--object_weight` by this many pixels, so that the background around the "
        "object (where shapes differ) is weighted too and the weight does not push colour into the frame.",
    )
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--checkpoint_every", type=int, default=25)
    parser.add_argument(
        "--keep_snapshots", action="store_true", help="Also keep the EMA pipeline of every evaluation (pipeline-STEP)."
    )
    parser.add_argument("--eval_samplers", nargs="+", default=["ode"], help="Samplers to evaluate with.")
    parser.add_argument(
        "--init_from",
        default=None,
        help="Start from the EMA weights of another run's checkpoint.pt (fresh optimizer and step count), e.g. to "
        "continue with `--degrade_context`.",
    )
    parser.add_argument(
        "--degrade_context",
        type=float,
        default=0.0,
        help="Fraction of training videos whose clean context is replaced by the model's own one-step estimates of it "
        "(see `degraded_context`): teaches continuation from imperfect, generated chunks.",
    )
    parser.add_argument("--degrade_levels", type=float, nargs=2, default=(0.25, 0.6))
    parser.add_argument(
        "--pack_frames",
        action="store_true",
        help="Pack each 3-frame chunk into the channels of one latent frame (`FramePackingAutoencoder`): 3x fewer "
        "tokens, about 5x faster steps at the same width.",
    )
    parser.add_argument("--width", type=int, default=128, help="Transformer width (heads of 32).")
    parser.add_argument("--ffn_dim", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args()
    if args.width < 32 or args.width % 32:
        parser.error(f"--width {args.width} must be a positive multiple of 32 (the attention heads are 32 wide).")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)

    pipe = build_pipeline(args.seed, args.pack_frames, args.width, args.ffn_dim, args.num_layers)
    pack = pipe.vae.encode if args.pack_frames else (lambda video: video)  # [B, C, F, H, W] -> latents
    # Latent frames per video and per chunk (packed: one latent frame per chunk)
    frames, chunk = (FRAMES // CHUNK, 1) if args.pack_frames else (FRAMES, CHUNK)
    model = pipe.transformer.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    elapsed_before = 0.0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    if args.init_from and not os.path.exists(ckpt_path):
        init = torch.load(args.init_from, weights_only=True)  # tensors and plain containers only
        for module in (model, ema):
            missing, unexpected = module.load_state_dict(init["ema"], strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{args.init_from} does not match this model (missing {missing}, unexpected {unexpected}): use "
                    "the same --pack_frames, --width, --ffn_dim and --num_layers as the run that wrote it."
                )
        print(f"initialised from the EMA weights of {args.init_from} (step {init['step']})")
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed_before = state["step"], state["elapsed"]
        print(f"resumed from step {step} ({elapsed_before / 60:.1f} min)")

    # Text embeddings of every prompt, once (the text encoder is frozen)
    embeds_all, _ = pipe.encode_prompt(list(ALL_PROMPTS), max_sequence_length=TEXT_TOKENS)  # [72, S, 64]
    num_chunks = frames // chunk
    levels = get_schedule(pipe.scheduler)[1][:-1]  # the 4-step Self-Forcing levels, unwarped: [1, 0.75, 0.5, 0.25]
    tokens_per_frame = (SIZE // PATCH) ** 2
    # the last clean chunk is context for no noisy chunk: drop it from the sequence (~20% less compute)
    clean_frames = frames - chunk
    keep = (frames + clean_frames) * tokens_per_frame
    mask = teacher_forcing_mask(frames, chunk, tokens_per_frame)[:keep, :keep]  # [N + N', N + N']
    frame_indices = torch.cat([torch.arange(frames), torch.arange(clean_frames)])
    metrics_path = os.path.join(args.output_dir, "metrics.csv")
    start = time.perf_counter()
    progress = tqdm(total=args.max_steps, initial=step, desc="pretrain")
    losses = []
    while step < args.max_steps:
        # Data: random prompts and motions, rendered on the fly, in [-1, 1]
        idx = torch.randint(len(ALL_PROMPTS), (args.batch_size,), generator=generator)
        seeds = torch.randint(2**31 - 1, (args.batch_size,), generator=generator).tolist()
        prompts = [ALL_PROMPTS[i] for i in idx.tolist()]
        video = render_batch(prompts, seeds).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, 12, H, W]
        x0 = pack(video)  # [B, C, F, H, W] latents
        noise = torch.randn(x0.shape, generator=generator)  # [B, C, F, H, W]
        sigma = sample_sigmas(args.batch_size, num_chunks, generator, args.uniform_fraction, levels)  # [B, L]
        sigma_f = sigma.repeat_interleave(chunk, dim=1)  # [B, F]
        s = sigma_f[:, None, :, None, None]  # [B, 1, F, 1, 1]
        x_t = (1 - s) * x0 + s * noise  # [B, C, F, H, W]
        context = x0[:, :, :clean_frames]  # [B, C, F', H, W]
        if args.degrade_context > 0:
            degrade = torch.rand(args.batch_size, generator=generator) < args.degrade_context  # [B]
            estimate = degraded_context(
                model, x0, embeds_all[idx], mask, frame_indices, clean_frames, generator, args.degrade_levels, chunk
            )
            context = torch.where(degrade[:, None, None, None, None], estimate, context)
        sequence = torch.cat([x_t, context], dim=2)  # [B, C, F + F', H, W]
        timesteps = torch.cat([sigma_f * 1000, torch.zeros_like(sigma_f[:, :clean_frames])], dim=1)  # [B, F + F']
        velocity = model(
            sequence, timesteps, embeds_all[idx], attention_mask=mask, frame_indices=frame_indices, return_dict=False
        )[0][:, :, :frames]  # [B, C, F, H, W]
        x0_pred = x_t - s * velocity  # the head's x0 prediction, as every sampler reads it
        weight = pack(loss_weights(video, args.object_weight, args.object_margin).expand_as(video))  # like x0
        loss = (weight * (x0_pred - x0) ** 2).mean() / weight.mean()
        if args.first_chunk_batch_size:
            b1 = args.first_chunk_batch_size
            idx1 = torch.randint(len(ALL_PROMPTS), (b1,), generator=generator)
            seeds1 = torch.randint(2**31 - 1, (b1,), generator=generator).tolist()
            prompts1 = [ALL_PROMPTS[i] for i in idx1.tolist()]
            video1 = render_batch(prompts1, seeds1)[:, :CHUNK].permute(0, 2, 1, 3, 4) * 2 - 1  # [b1, 3, 3, H, W]
            x0_1 = pack(video1)  # [b1, C, Fc, H, W]
            noise1 = torch.randn(x0_1.shape, generator=generator)
            sigma1 = sample_sigmas(b1, 1, generator, args.uniform_fraction, levels)  # [b1, 1]
            s1 = sigma1[:, None, :, None, None]  # [b1, 1, 1, 1, 1]
            x_t1 = (1 - s1) * x0_1 + s1 * noise1
            velocity1 = model(x_t1, (sigma1 * 1000).expand(b1, chunk), embeds_all[idx1], return_dict=False)[0]
            weight1 = pack(loss_weights(video1, args.object_weight, args.object_margin).expand_as(video1))
            loss = loss + (weight1 * (x_t1 - s1 * velocity1 - x0_1) ** 2).mean() / weight1.mean()

        # linear warm-up, then cosine decay to 10% of the peak at max_steps
        progress_frac = min(1.0, step / args.max_steps)
        lr = args.learning_rate * min(1.0, (step + 1) / args.warmup_steps)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        elapsed = elapsed_before + time.perf_counter() - start
        out_of_time = elapsed > args.max_minutes * 60 or step == args.stop_at_step

        if step % args.checkpoint_every == 0 or out_of_time or step == args.max_steps:
            state = {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "elapsed": elapsed,
            }
            save_atomic(state, ckpt_path)
        if step % args.eval_every == 0 or out_of_time or step == args.max_steps:
            eval_pipe = SelfForcingPipeline(
                pipe.tokenizer,
                pipe.text_encoder,
                ema,
                pipe.scheduler,
                pipe.vae,
                SIZE,
                SIZE,
                FRAMES,
                TEXT_TOKENS,
                "ode",
                SAMPLING_SIGMAS,
                pipe.config.default_num_frames_per_chunk,
            )
            eval_pipe.set_progress_bar_config(disable=True)
            row = {"step": step, "minutes": round(elapsed / 60, 2), "loss": round(sum(losses) / len(losses), 5)}
            for sampler in args.eval_samplers:
                scores = evaluate(eval_pipe, seed=12345, sampler=sampler)
                row.update({f"{sampler}/{k}": round(v, 4) for k, v in scores.items()})
            losses = []
            new = not os.path.exists(metrics_path)
            with open(metrics_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
            tqdm.write(str(row))
            tmp_dir = os.path.join(args.output_dir, "pipeline.tmp")
            eval_pipe.save_pretrained(tmp_dir)
            final_dir = os.path.join(args.output_dir, "pipeline")
            if os.path.exists(final_dir):
                os.rename(final_dir, final_dir + ".old")
            os.rename(tmp_dir, final_dir)
            if os.path.exists(final_dir + ".old"):
                shutil.rmtree(final_dir + ".old")
            if args.keep_snapshots:
                shutil.copytree(final_dir, os.path.join(args.output_dir, f"pipeline-{step}"), dirs_exist_ok=True)
        if out_of_time:
            tqdm.write(f"stopping after {elapsed / 60:.1f} minutes at step {step}")
            break
    progress.close()


if __name__ == "__main__":
    main()
