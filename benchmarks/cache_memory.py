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
Memory of streaming generation by cache policy, at 1x, 2x and 4x the frames: the CPU allocator's peak while a video is
generated (from `torch.profiler`'s memory events), against the ideal from counting the cache's bytes.

Usage:
    python benchmarks/cache_memory.py [--frames 8] [--window 4] [--sink 1] [--layers 8]     # about a minute

The model is a small causal Wan transformer (`--layers` layers of 4 heads x 32) on 16x16 pixel frames, one latent frame
per chunk, so that its keys and values per frame outweigh the latents 170 to 1, as in Wan2.1-1.3B (1440 to 1): the
peak is then the cache plus the activations of one chunk. Each row prints the peak, the peak less the returned
latents (the video, which the caller keeps), the ratio to 1x, and the cache's storage counted from its shape; the
rolling and recompute caches stay at the window, the full cache grows with the video.
"""

from __future__ import annotations

import argparse

import torch

from trl_arcopo import RolloutNoise
from trl_arcopo.testing_utils import cpu_peak_bytes, tiny_pipeline


def measure(pipe, embeds, frames: int) -> tuple[int, int, int]:
    """`(peak, peak less the returned latents, cache bytes)` of generating one video of `frames` latent frames."""
    timesteps, sigmas = pipe.get_schedule()
    noise = RolloutNoise.sample((1, 3, frames, 16, 16), 1, len(timesteps), generator=torch.Generator().manual_seed(0))
    caches = []

    def generate():
        cache = pipe.prepare_cache(1, frames - 1, 16, 16)
        caches.append(cache)
        with torch.no_grad():
            return pipe.generate_latents(embeds, noise, cache, timesteps, sigmas)

    peak, latents = cpu_peak_bytes(generate)
    return peak, peak - latents.numel() * latents.element_size(), caches[0].nbytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="Latent frames of the 1x video.")
    parser.add_argument("--window", type=int, default=4, help="`local_attn_frames` (sink included).")
    parser.add_argument("--sink", type=int, default=1, help="`sink_frames`.")
    parser.add_argument("--layers", type=int, default=8, help="Transformer layers.")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    pipe = tiny_pipeline(num_layers=args.layers, heads=4, head_dim=32)
    pipe.register_to_config(default_num_frames_per_chunk=1)
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    print(f"window {args.window} frames (sink {args.sink}), {args.layers} layers, 1 frame per chunk, 16x16 pixels")
    print("| policy | frames | peak MiB | peak less the video MiB | ratio to 1x | cache MiB (counted) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for policy in ("full", "rolling", "recompute"):
        pipe.register_to_config(cache_policy=policy, local_attn_frames=args.window, sink_frames=args.sink)
        base = None
        for scale in (1, 2, 4):
            frames = scale * args.frames
            peak, working, cache = measure(pipe, embeds, frames)
            base = base or peak
            print(
                f"| {policy} | {frames} | {peak / 2**20:.2f} | {working / 2**20:.2f} | {peak / base:.3f} | "
                f"{cache / 2**20:.2f} |"
            )


if __name__ == "__main__":
    main()
