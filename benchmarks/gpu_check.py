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
One check for a lent GPU: the Self-Forcing 1.3B transformer (Wan2.1-T2V-1.3B config, random weights, bf16) at the
paper's size (480x832x81: latent 21x60x104, 7 chunks of 3), measured against `trl_arcopo.planning.plan`.

Usage:
    python benchmarks/gpu_check.py --output_dir outputs/gpu_check      # one H100/H200: a few minutes
    python benchmarks/gpu_check.py --tiny                                # the same code path on CPU, well under a minute

Nothing is downloaded: the transformer is built from its config with random weights, the text encoder is a tiny
random UMT5 with Wan's 4096-wide output, and the pipeline works on latents directly (no VAE: decoding is not what
is measured). Every forward runs under `accelerator.autocast()`, as `ARCoPOTrainer.train()` runs them with
`bf16=True`. The steps:

1. **Streaming equals the block-causal forward** on a 2-chunk video: the clean commit passes with the KV cache
   against one full forward with the block-causal mask, and a denoising pass of chunk 1 against the cache of chunk 0
   against the full forward with per-frame timesteps. In float32 (TF32 off) the tolerance is 1e-4 relative RMS error;
   in bf16 it is 2e-2 (bf16 keeps 8 significant bits, a relative rounding of 2^-9 = 2e-3 per operation, and the 30
   layers compound it; the bf16-vs-float32 difference of the streaming path itself is printed for scale).
2. **One forked group** (`trl_arcopo.rollout.sample_group`, `G` branches at a fixed pivot) and **one AR-CoPO update**
   (`ARCoPOTrainer.accumulate_gradients`: `K` anchors, every denoising step, gradient checkpointing), each timed,
   with its peak memory (`torch.cuda.max_memory_allocated` above the memory allocated when the phase starts; on CPU
   the profiler's allocator peak) and its chunk passes counted by a forward hook.
3. The plan for the same settings (its FLOPs give the achieved TFLOP/s and the MFU against the GPU's dense bf16
   peak) and the ratio measured / predicted of every number; `G` is lowered when the plan predicts that the group
   would not fit in the GPU's memory.

Writes `gpu_check.json` and `gpu_check.md` to `--output_dir`; exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from datasets import Dataset
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, SelfForcingPipeline
from trl_arcopo.kv_cache import KVCache
from trl_arcopo.models import CausalWanTransformer3DModel, block_causal_mask
from trl_arcopo.planning import (
    DEFAULT_LORA_TARGETS,
    GPUS,
    WAN_2_1_T2V_1_3B,
    GeneratorProfile,
    format_bytes,
    format_flops,
    plan_config,
)
from trl_arcopo.rollout import sample_group
from trl_arcopo.sampling import self_forcing_scheduler
from trl_arcopo.testing_utils import tiny_text_encoder, tiny_tokenizer


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plan_vs_measured import allocator_peak  # the CPU allocator's peak, for --tiny


PROMPT = "a red fox jumps over a blue car"
# --tiny: the same code path with a small transformer and a small latent video (4 chunks of 3 frames, 8x8 latents)
TINY = dict(
    transformer=dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=64,
    ),
    latent=(12, 8, 8), text_tokens=8, pivot=2,
)  # fmt: skip
FULL = dict(transformer=WAN_2_1_T2V_1_3B, latent=(21, 60, 104), text_tokens=512, pivot=3)
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative RMS error, see the module docstring


def no_reward(prompts, videos, **kwargs):
    """A placeholder: the check draws the group's rewards itself (rewards and decoding are not measured)."""
    return [0.0] * len(prompts)


def gpu_key(device: torch.device) -> str | None:
    """The `GPUS` key of this device, from its name (`None` on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key, marker in (("h200", "H200"), ("h100-pcie", "H100 PCIE"), ("h100", "H100"), ("a100", "A100"),
                        ("l40s", "L40S"), ("l4", "L4")):  # fmt: skip
        if marker in name:
            return key
    return None


def keep_fp32_modules(transformer: torch.nn.Module) -> None:
    """Put back in float32 the modules diffusers keeps there when loading in bf16 (`_keep_in_fp32_modules`)."""
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for name, module in transformer.named_modules():
        if any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep):
            module.float()


def build_pipeline(setup: dict, device: torch.device) -> SelfForcingPipeline:
    """The causal transformer with random weights (built on `device`), in bf16, in a latent-space pipeline."""
    torch.manual_seed(0)
    with torch.device(device):
        transformer = CausalWanTransformer3DModel(**setup["transformer"])
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note about the fp32 modules: they are put back just below
    transformer.to(torch.bfloat16)
    diffusers_logging.set_verbosity(verbosity)
    keep_fp32_modules(transformer)
    frames, height, width = setup["latent"]
    text_dim = setup["transformer"]["text_dim"]
    pipe = SelfForcingPipeline(
        tiny_tokenizer(), tiny_text_encoder(d_model=text_dim, seed=0), transformer.eval(), self_forcing_scheduler(),
        None, height, width, frames, setup["text_tokens"],
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def streaming_check(transformer, setup: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Cached streaming vs the full block-causal forward on the first 2 chunks (see the module docstring)."""
    chunk = 3
    _, height, width = setup["latent"]
    p_h, p_w = transformer.config.patch_size[1:]
    tpf = (height // p_h) * (width // p_w)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, transformer.config.in_channels, 2 * chunk, height, width, generator=g, device=device)
    text = torch.randn(1, setup["text_tokens"], transformer.config.text_dim, generator=g, device=device)
    x, text = x.to(dtype), text.to(dtype)
    mask = block_causal_mask(2 * chunk, chunk, tpf, device=device)
    zeros = torch.zeros(1, device=device)
    t = 937.5
    # (a) the clean commit passes of both chunks == one full forward at t = 0
    full = transformer(x, zeros, text, attention_mask=mask).sample
    cache = KVCache.from_transformer(transformer, 1, 2 * chunk, height, width, dtype=dtype, device=device)
    streamed = [
        transformer(x[:, :, c * chunk : (c + 1) * chunk], zeros, text, kv_cache=cache, frame_offset=c * chunk,
                    update_cache=True).sample
        for c in range(2)
    ]  # fmt: skip
    commit = torch.cat(streamed, dim=2)
    # (b) a denoising pass of a noisy chunk 1 against chunk 0 in the cache == the full forward, per-frame timesteps
    noise = torch.randn(x[:, :, chunk:].shape, generator=g, device=device).to(dtype)
    noisy = torch.cat([x[:, :, :chunk], noise], dim=2)
    per_frame = torch.tensor([[0.0] * chunk + [t] * chunk], device=device)
    full_noisy = transformer(noisy, per_frame, text, attention_mask=mask).sample[:, :, chunk:]
    cache = KVCache.from_transformer(transformer, 1, 2 * chunk, height, width, dtype=dtype, device=device)
    transformer(noisy[:, :, :chunk], zeros, text, kv_cache=cache, frame_offset=0, update_cache=True)
    denoise = transformer(noisy[:, :, chunk:], torch.full((1,), t, device=device), text, kv_cache=cache,
                          frame_offset=chunk).sample  # fmt: skip
    return {
        "commit_relative_error": relative_error(commit, full),
        "denoise_relative_error": relative_error(denoise, full_noisy),
        "commit_max_abs_diff": (commit.float() - full.float()).abs().max().item(),
        "outputs": (commit.float(), denoise.float()),
    }


def run_streaming_checks(transformer, setup: dict, device: torch.device) -> dict:
    """The check in bf16 (the model as trained) and in float32 on a copy (TF32 off)."""
    bf16 = streaming_check(transformer, setup, device, torch.bfloat16)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = copy.deepcopy(transformer).float()
        fp32 = streaming_check(reference, setup, device, torch.float32)
        del reference
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    out = {}
    for name, result in (("float32", fp32), ("bfloat16", bf16)):
        err = max(result["commit_relative_error"], result["denoise_relative_error"])
        out[name] = {
            **{k: v for k, v in result.items() if k != "outputs"},
            "tolerance": TOLERANCE[name],
            "passed": err <= TOLERANCE[name],
        }
    out["bfloat16"]["rounding_vs_float32"] = max(
        relative_error(a, b) for a, b in zip(bf16["outputs"], fp32["outputs"])
    )
    return out


def measure(fn, device: torch.device):
    """`(result, seconds, peak bytes above the start, absolute peak or None)` of `fn()`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_bytes = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        return out, seconds, peak - start_bytes, peak
    start = time.perf_counter()
    out, peak, _ = allocator_peak(fn)
    return out, time.perf_counter() - start, peak, None


def choose_group_size(
    config: dict, generator: GeneratorProfile, gpu: str | None, requested: int
) -> tuple[int, int | None]:
    """
    `(G, rollout_batch_size)`: the largest `G <= requested`, with the largest branch sub-batch (`None`: all at once),
    whose run the plan predicts to fit in 90% of the GPU's memory; `config`'s own `rollout_batch_size` is kept.
    """
    if gpu is None:
        return requested, config.get("rollout_batch_size")
    for g in range(requested, 1, -1):
        sizes = [config["rollout_batch_size"]] if config.get("rollout_batch_size") else [None, *range(g, 0, -1)]
        for size in sizes:
            p = plan_config({**config, "num_generations": g, "num_anchors": min(config["num_anchors"], g),
                             "rollout_batch_size": size}, generator, gpu=gpu)  # fmt: skip
            if p.peak_memory_bytes <= 0.9 * p.gpu.memory_bytes:
                return g, size
    return 2, 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="A small transformer and video on CPU (same code path).")
    parser.add_argument("--output_dir", default="outputs/gpu_check")
    parser.add_argument("--num_generations", type=int, default=12)
    parser.add_argument("--num_anchors", type=int, default=4)
    parser.add_argument("--pivot", type=int, default=None, help="The fork chunk (default 3 of 7; --tiny: 2 of 4).")
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument(
        "--rollout_batch_size", type=int, default=None,
        help="Branches per rollout forward (default: the largest that the plan fits in 90%% of the GPU).",
    )  # fmt: skip
    parser.add_argument("--anchor_batch_size", type=int, default=None, help="Anchors per update forward.")
    parser.add_argument("--mfu", type=float, default=0.35, help="The plan's assumed MFU, for the predicted seconds.")
    args = parser.parse_args(argv)

    if args.tiny:
        device, setup = torch.device("cpu"), TINY
    elif torch.cuda.is_available():
        device, setup = torch.device("cuda"), FULL
    else:
        parser.error("No CUDA device: this check needs a GPU (or run the same code path on CPU with --tiny).")
    os.makedirs(args.output_dir, exist_ok=True)
    gpu = gpu_key(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpu_key": gpu,
              "torch": torch.__version__}  # fmt: skip
    print(f"device: {report['device']} (plan: {gpu or 'no GPU entry; seconds use the H100 peak'})", flush=True)

    # 1. the model, and streaming vs the full block-causal forward
    start = time.perf_counter()
    pipe = build_pipeline(setup, device)
    report["build_seconds"] = time.perf_counter() - start
    report["streaming"] = run_streaming_checks(pipe.transformer, setup, device)
    for name, r in report["streaming"].items():
        print(f"streaming == block-causal ({name}): commit {r['commit_relative_error']:.2e}, denoise "
              f"{r['denoise_relative_error']:.2e} (tolerance {r['tolerance']:.0e}): "
              f"{'ok' if r['passed'] else 'FAILED'}", flush=True)  # fmt: skip

    # 2. the plan of this run (G lowered if the group would not fit)
    generator = GeneratorProfile.from_pipeline(pipe)
    pivot = args.pivot if args.pivot is not None else setup["pivot"]
    config = dict(
        num_generations=args.num_generations, num_anchors=args.num_anchors, num_iterations=1, pivot_chunk=pivot,
        torch_dtype="bfloat16", bf16=True, activation_checkpointing=True, lora_r=args.lora_r,
        lora_target_modules=list(DEFAULT_LORA_TARGETS), rollout_batch_size=args.rollout_batch_size,
        anchor_batch_size=args.anchor_batch_size,
    )  # fmt: skip
    g, rollout_batch_size = choose_group_size(config, generator, gpu, args.num_generations)
    if g != args.num_generations:
        print(f"G={args.num_generations} would not fit in this GPU's memory by the plan: using G={g}", flush=True)
    config.update(num_generations=g, num_anchors=min(args.num_anchors, g), rollout_batch_size=rollout_batch_size)
    report["settings"] = {k: config[k] for k in ("num_generations", "num_anchors", "rollout_batch_size",
                                                 "anchor_batch_size", "pivot_chunk")}  # fmt: skip
    print(f"settings: {report['settings']}", flush=True)
    predicted = plan_config(config, generator, gpu=gpu or "h100", mfu=args.mfu)
    report["plan"] = predicted.to_dict()

    # 3. the trainer (LoRA r=64 on attention and feed-forward, checkpointing), one forked group and one update
    trainer = ARCoPOTrainer(
        pipeline=pipe,
        reward_funcs=[no_reward],  # the group's rewards are drawn below
        args=ARCoPOConfig(
            output_dir=args.output_dir, max_steps=1, num_generations=g, num_anchors=config["num_anchors"],
            num_iterations=1, pivot_chunk=pivot, bf16=True, activation_checkpointing=True, report_to="none",
            save_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True, rollout_batch_size=rollout_batch_size,
            anchor_batch_size=args.anchor_batch_size,
        ),
        train_dataset=Dataset.from_dict({"prompt": [PROMPT]}),
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=list(DEFAULT_LORA_TARGETS)),
    )  # fmt: skip
    autocast = trainer.accelerator.autocast  # what `train()` runs every forward under with bf16=True
    passes = {"rollout": 0, "update": 0}

    def count(module, inputs, kwargs):
        passes["update" if torch.is_grad_enabled() else "rollout"] += inputs[0].shape[0]

    hook = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    embeds, _ = pipe.encode_prompt([PROMPT], device=device)
    rng = torch.Generator(device).manual_seed(0)
    results, failures = {}, []
    try:
        pipe.transformer.eval()
        with autocast():
            group, seconds, peak, absolute = measure(
                lambda: sample_group(
                    pipe, trainer.spec, [PROMPT], embeds, g, rng, pivot, rollout_batch_size=rollout_batch_size
                ),
                device,
            )
        results["rollout"] = dict(seconds=seconds, peak_bytes=peak, absolute_peak_bytes=absolute)
        group.with_rewards(
            torch.randn(1, g, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        )
        with autocast():
            _, seconds, peak, absolute = measure(lambda: trainer.accumulate_gradients(group), device)
        results["update"] = dict(seconds=seconds, peak_bytes=peak, absolute_peak_bytes=absolute)
        stats = trainer._metrics["train"]  # the statistics the trainer logs
        results["update"]["first_ratio"] = [stats["first_step/ratio/min"][-1], stats["first_step/ratio/max"][-1]]
    except torch.cuda.OutOfMemoryError as error:
        failures.append(f"out of memory: {str(error).splitlines()[0]}")
    finally:
        hook.remove()
    results["passes"] = passes

    # 4. measured against predicted
    rollout_flops = predicted.phase("prefix").flops + predicted.phase("branches").flops
    rollout_seconds = predicted.phase("prefix").seconds + predicted.phase("branches").seconds
    fixed = sum(m.bytes for m in predicted.memory if m.phase == "update")
    peak_flops = GPUS[gpu].bf16_flops if gpu else None
    rows = []
    for phase, flops, pred_s, pred_bytes, pred_passes in (
        ("rollout (forked group)", rollout_flops, rollout_seconds, predicted.rollout_peak_bytes(decode=False),
         predicted.phase("prefix").chunk_forwards + predicted.phase("branches").chunk_forwards),
        ("update (one inner step)", predicted.phase("update").flops, predicted.phase("update").seconds, fixed,
         predicted.phase("update").chunk_forwards),
    ):  # fmt: skip
        key = phase.split()[0]
        m = results.get(key)
        if m is None:
            continue
        achieved = flops / m["seconds"]
        row = dict(
            phase=phase, flops=flops, predicted_seconds=pred_s, seconds=m["seconds"], tflops=achieved / 1e12,
            mfu=achieved / peak_flops if peak_flops else None, predicted_peak_bytes=pred_bytes,
            peak_bytes=m["peak_bytes"], predicted_passes=pred_passes, passes=passes[key],
        )  # fmt: skip
        rows.append(row)
        if row["passes"] != row["predicted_passes"]:
            failures.append(f"{phase}: {row['passes']} chunk passes, the plan counts {row['predicted_passes']}")
    results["rows"] = rows
    report["results"] = results
    for name, r in report["streaming"].items():
        if not r["passed"]:
            failures.append(f"streaming != block-causal forward in {name}")
    if "update" in results and results["update"]["first_ratio"] != [1.0, 1.0]:
        failures.append(f"the first inner step's ratio is {results['update']['first_ratio']}, not exactly 1")
    report["failures"] = failures
    markdown = to_markdown(report, predicted, g, pivot)
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown)
    print(markdown, flush=True)
    return 1 if failures else 0


def to_markdown(report: dict, predicted, g: int, pivot: int) -> str:
    v = predicted.video
    lines = [
        f"# GPU check: {report['device']}",
        "",
        (
            f"Causal Wan transformer, {predicted.parameters['transformer'] / 1e6:,.1f}M parameters (bf16, random "
            f"weights), latent {v.latent_frames}x{v.latent_height}x{v.latent_width} ({v.num_chunks} chunks of "
            f"{v.num_frames_per_chunk}), G={g}, K={predicted.settings.num_anchors}, pivot {pivot}, "
            f"{predicted.settings.num_denoising_steps} steps, LoRA r={predicted.settings.lora_r}, gradient "
            f"checkpointing, rollout_batch_size {predicted.settings.rollout_batch_size}, anchor_batch_size "
            f"{predicted.settings.anchor_batch_size}; plan at MFU {predicted.mfu:.0%} on {predicted.gpu.name}. Built in "
            f"{report['build_seconds']:.1f} s."
        ),
        "",
        "| check | relative error (commit) | relative error (denoise) | tolerance | result |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, r in report["streaming"].items():
        lines.append(
            f"| streaming == block-causal, {name} | {r['commit_relative_error']:.2e} | "
            f"{r['denoise_relative_error']:.2e} | {r['tolerance']:.0e} | {'ok' if r['passed'] else 'FAILED'} |"
        )
    lines.append(
        f"\nbf16 rounding of the streaming path itself (bf16 vs float32): "
        f"{report['streaming']['bfloat16']['rounding_vs_float32']:.2e}.\n"
    )
    lines += [
        (
            "| phase | chunk passes (plan) | seconds (plan) | FLOPs (plan) | TFLOP/s | MFU | peak above start (plan) "
            "| measured / plan |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"].get("rows", []):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = r["peak_bytes"] / r["predicted_peak_bytes"] if r["predicted_peak_bytes"] else math.nan
        lines.append(
            f"| {r['phase']} | {r['passes']} ({r['predicted_passes']:.0f}) | {r['seconds']:.2f} "
            f"({r['predicted_seconds']:.2f}) | {format_flops(r['flops'])} | {r['tflops']:.3g} | {mfu} | "
            f"{format_bytes(r['peak_bytes'])} ({format_bytes(r['predicted_peak_bytes'])}) | {ratio:.3f} |"
        )
    update = report["results"].get("update")
    if update:
        lines.append(f"\nFirst inner step's ratio (min, max): {update['first_ratio']} (must be exactly 1).")
        if update.get("absolute_peak_bytes"):
            lines.append(
                f"Absolute peaks: rollout {format_bytes(report['results']['rollout']['absolute_peak_bytes'])}, "
                f"update {format_bytes(update['absolute_peak_bytes'])} (the plan's peak of a training process with "
                f"this model, optimizer state included: {format_bytes(predicted.peak_memory_bytes)})."
            )
    if report["failures"]:
        lines += ["", "FAILED:", *[f"- {f}" for f in report["failures"]]]
    else:
        lines += ["", "All checks passed."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
