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
Rollout cost, measured against the ideal from counting FLOPs, in one run:

(a) a forked group (prefix once + G branches) vs G independent full rollouts (same noises, same batch size G);
(b) streaming with the KV cache vs recomputing the whole clean prefix at every step of every chunk (one
    block-causal full-sequence forward per step, as without a cache).

Usage:
    python benchmarks/rollout.py [--configs tiny small] [--repeats 2] [--group_size G]     # about 12 minutes

Each row prints the measured time ratio next to the ideal ratio (FLOPs of every transformer forward, from the config),
and checks that both ways give the same video.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from trl_arcopo import RolloutNoise, SelfForcingPipeline, forked_rollout, neighbor_noise
from trl_arcopo.models import block_causal_mask
from trl_arcopo.sampling import self_forcing_scheduler
from trl_arcopo.testing_utils import tiny_text_encoder, tiny_tokenizer, tiny_transformer


CONFIGS = {
    # the size of the embedded Moving Shapes model: 32x32 pixels, patch 4 -> 64 tokens per frame, 12 frames
    "tiny": dict(layers=4, heads=4, head_dim=32, ffn=512, size=32, patch=4, frames=12, group_size=12),
    # 4x the tokens and a wider, deeper network
    # (G = 4 keeps its run to a few minutes; the work per call is already large)
    "small": dict(layers=8, heads=8, head_dim=32, ffn=1024, size=64, patch=4, frames=12, group_size=4),
}
CHUNK = 3
TEXT_TOKENS = 16


def transformer_flops(config, num_query_tokens: int, num_key_tokens: int, text_tokens: int) -> float:
    """
    Approximate multiply-add FLOPs (x2) of one transformer forward on `num_query_tokens` tokens attending to
    `num_key_tokens` keys (its own included): projections, attention and FFN of every block. The ideal
    time ratios are ratios of these counts.
    """
    d = config.num_attention_heads * config.attention_head_dim
    per_layer = (
        2 * num_query_tokens * d * d * 4  # self-attention q, k, v, o
        + 2 * num_query_tokens * num_key_tokens * d * 2  # QK^T and AV
        + 2 * num_query_tokens * d * d * 2  # cross-attention q, o
        + 2 * text_tokens * d * d * 2  # cross-attention k, v (text)
        + 2 * num_query_tokens * text_tokens * d * 2  # cross-attention scores
        + 2 * num_query_tokens * d * config.ffn_dim * 2  # FFN
    )
    head = 2 * num_query_tokens * d * config.out_channels * math.prod(config.patch_size) * 2
    return config.num_layers * per_layer + head


def build(cfg) -> SelfForcingPipeline:
    transformer = tiny_transformer(
        in_channels=3,
        num_layers=cfg["layers"],
        heads=cfg["heads"],
        head_dim=cfg["head_dim"],
        ffn_dim=cfg["ffn"],
        patch_size=(1, cfg["patch"], cfg["patch"]),
    )
    pipe = SelfForcingPipeline(
        tiny_tokenizer(),
        tiny_text_encoder(),
        transformer,
        self_forcing_scheduler(),
        None,
        cfg["size"],
        cfg["size"],
        cfg["frames"],
        TEXT_TOKENS,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, repeats, warmup=True):
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.no_grad()
def recompute_prefix_rollout(pipe, embeds, noise, timesteps, sigmas, tokens_per_frame):
    """Streaming without a cache: every step re-runs the whole clean prefix with the block-causal mask."""
    transformer = pipe.transformer
    chunks = []
    for c in range(noise.num_chunks):
        x = noise.chunk_initial(c)
        for j in range(len(timesteps)):
            sequence = torch.cat([*chunks, x], dim=2)  # [B, C, (c + 1) * Fc, H, W]
            frames = sequence.shape[2]
            t = torch.zeros(x.shape[0], frames)
            t[:, -CHUNK:] = timesteps[j]
            mask = block_causal_mask(frames, CHUNK, tokens_per_frame)
            v = transformer(sequence, t, embeds, attention_mask=mask, return_dict=False)[0][:, :, -CHUNK:]
            x0 = (x.double() - sigmas[j].item() * v.double()).to(x.dtype)
            if j < len(timesteps) - 1:
                s = sigmas[j + 1].item()
                x = (1 - s) * x0 + s * noise.chunk_renoise(c)[:, j]
        chunks.append(x0)
    return torch.cat(chunks, dim=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per measurement (best of).")
    parser.add_argument(
        "--group_size", type=int, default=None, help="G, also the batch of the cache comparison (default: per config)."
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.configs:
        cfg = CONFIGS[name]
        pipe = build(cfg)
        conf = pipe.transformer.config
        size, frames, g = cfg["size"], cfg["frames"], args.group_size or cfg["group_size"]
        tpf = (size // cfg["patch"]) ** 2
        n = CHUNK * tpf  # tokens per chunk
        num_chunks = frames // CHUNK
        timesteps, sigmas = pipe.get_schedule()
        steps = len(timesteps)
        params = sum(p.numel() for p in pipe.transformer.parameters())
        print(
            f"\n[{name}] {params / 1e6:.2f}M params, {size}x{size}x{frames} frames, {tpf} tokens/frame, "
            f"{num_chunks} chunks of {CHUNK} frames, {steps} steps, G={g}"
        )

        def chunk_flops(batch, c):
            passes = steps + (1 if c < num_chunks - 1 else 0)  # the last chunk is not committed
            return batch * passes * transformer_flops(conf, n, (c + 1) * n, TEXT_TOKENS)

        # (a) forked vs independent, averaged over the pivots (AR-CoPO draws the pivot uniformly)
        embeds, _ = pipe.encode_prompt(["a red fox jumps"])
        noise = RolloutNoise.sample(
            (1, 3, frames, size, size), CHUNK, steps, generator=torch.Generator().manual_seed(0)
        )
        embeds_g = embeds.repeat_interleave(g, 0)
        fork_time = indep_time = fork_flops = indep_flops = 0.0
        max_diff = 0.0
        for pivot in range(num_chunks):
            branch = neighbor_noise(noise.chunk_initial(pivot), g, 0.5, torch.Generator().manual_seed(pivot))
            t_fork, group = timed(
                lambda: forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, size, size),
                args.repeats,
                warmup=pivot == 0,
            )
            noise_g = noise.repeat_interleave(g).with_chunk_initial(pivot, branch)

            def independent():
                with torch.no_grad():
                    cache = pipe.prepare_cache(g, frames - CHUNK, size, size)
                    return pipe.generate_latents(embeds_g, noise_g, cache, timesteps, sigmas)

            t_ind, lat = timed(independent, args.repeats, warmup=pivot == 0)
            max_diff = max(max_diff, (group.latents - lat).abs().max().item())
            fork_time += t_fork
            indep_time += t_ind
            fork_flops += sum(chunk_flops(1, c) for c in range(pivot)) + sum(
                chunk_flops(g, c) for c in range(pivot, num_chunks)
            )
            indep_flops += sum(chunk_flops(g, c) for c in range(num_chunks))
        rows.append((name, "forked group / G independent", fork_time / indep_time, fork_flops / indep_flops, max_diff))
        print_row(*rows[-1])

        # (b) cached streaming vs recomputing the prefix
        batch = g  # the batch the branches of a group run at
        embeds_b = embeds.repeat_interleave(batch, 0)
        noise_b = noise.repeat_interleave(batch)

        def cached():
            with torch.no_grad():
                return pipe.generate_latents(
                    embeds_b, noise_b, pipe.prepare_cache(batch, frames - CHUNK, size, size), timesteps, sigmas
                )

        t_cache, a = timed(cached, args.repeats)
        t_recompute, b = timed(
            lambda: recompute_prefix_rollout(pipe, embeds_b, noise_b, timesteps, sigmas, tpf), args.repeats
        )
        cache_flops = sum(chunk_flops(batch, c) for c in range(num_chunks))
        recompute_flops = sum(
            batch * steps * transformer_flops(conf, (c + 1) * n, (c + 1) * n, TEXT_TOKENS) for c in range(num_chunks)
        )
        rows.append(
            (
                name,
                "KV cache / recompute prefix",
                t_cache / t_recompute,
                cache_flops / recompute_flops,
                (a - b).abs().max().item(),
            )
        )
        print_row(*rows[-1])

    print(f"\n{HEADER}")
    for row in rows:
        print_row(*row)


HEADER = f"{'config':<7} {'comparison':<30} {'measured':>9} {'ideal':>7} {'meas/ideal':>10} {'max |diff|':>11}"


def print_row(name, what, measured, ideal, diff):
    print(f"{name:<7} {what:<30} {measured:>9.3f} {ideal:>7.3f} {measured / ideal:>10.2f} {diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
