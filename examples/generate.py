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
Streaming generation and a forked group with `SelfForcingPipeline`.

    python examples/generate.py                                   # tiny randomly initialised model, CPU, seconds
    python examples/generate.py --model path/to/self-forcing-diffusers --height 480 --width 832 --num_frames 81

Writes to `--output_dir`: `video.gif` (one streamed video) and `forked_group.gif` (G branches forked at one chunk, side
by side: identical before the fork, different after), plus `summary.json` (shapes, timings, forward passes).
"""

import argparse
import json
import os
import time

import torch
from diffusers.utils import export_to_gif

from trl_arcopo import RolloutSpec, SelfForcingPipeline, sample_group
from trl_arcopo.testing_utils import tiny_pipeline


def to_pil(frames):  # [F, C, H, W] in [0, 1]
    from PIL import Image

    arrays = (frames.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a).resize((a.shape[1] * 4, a.shape[0] * 4), Image.NEAREST) for a in arrays]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A SelfForcingPipeline folder or Hub id (default: tiny model).")
    parser.add_argument("--prompt", default="a red fox jumps over a blue car")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--fork_at", type=int, default=1, help="Chunk where the group forks.")
    parser.add_argument("--num_branches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/generate")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = SelfForcingPipeline.from_pretrained(args.model) if args.model else tiny_pipeline()
    pipe.to(device)
    os.makedirs(args.output_dir, exist_ok=True)
    height = args.height or pipe.config.default_height
    width = args.width or pipe.config.default_width
    num_frames = args.num_frames or pipe.config.default_num_frames

    # 1. One streamed video
    start = time.perf_counter()
    video = pipe(
        args.prompt,
        height=height,
        width=width,
        num_frames=num_frames,
        output_type="pt",
        generator=torch.Generator(device).manual_seed(args.seed),
    ).frames[0]
    stream_seconds = time.perf_counter() - start
    export_to_gif(to_pil(video.cpu()), os.path.join(args.output_dir, "video.gif"))

    # 2. A forked group: prefix once, then G branches that differ only in one chunk's initial noise
    spec = RolloutSpec.from_pipeline(pipe, height, width, num_frames)
    embeds, _ = pipe.encode_prompt(args.prompt)
    fork_at = min(args.fork_at, spec.num_chunks - 1)
    generator = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    group = sample_group(pipe, spec, [args.prompt], embeds, args.num_branches, generator, pivot=fork_at)
    fork_seconds = time.perf_counter() - start
    frames = pipe.decode_latents(group.latents[0], output_type="pt")  # [G, F, C, H, W]
    side_by_side = torch.cat(list(frames.cpu()), dim=-1)  # [F, C, H, G * W]
    export_to_gif(to_pil(side_by_side), os.path.join(args.output_dir, "forked_group.gif"))

    summary = {
        "prompt": args.prompt,
        "video_shape": list(video.shape),
        "stream_seconds": round(stream_seconds, 3),
        "fork_at": fork_at,
        "num_branches": args.num_branches,
        "group_seconds": round(fork_seconds, 3),
        "group_forward_passes": group.num_forward_passes,
        "independent_forward_passes": args.num_branches * spec.num_chunks * (len(spec.timesteps) + 1),
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
