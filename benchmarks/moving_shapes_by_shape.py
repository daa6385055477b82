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
Where an adapter wins and loses on Moving Shapes: base vs adapter per shape, on the main job's held-out evaluation.

    python benchmarks/moving_shapes_by_shape.py --adapter outputs/arcopo-moving-shapes            # a --seed 0 job
    python benchmarks/moving_shapes_by_shape.py --adapter outputs/arcopo-moving-shapes-seed1 --seed 1

The videos are those of `examples/train_arcopo.py`'s held-out evaluation for its `--seed` (12 prompts × `--num_seeds`
seed sets, evaluation seed `seed + 1`), so the rows add up to its `eval_table.md`. Prints a markdown table of the
all-correct rate, the shape score, the preference (prominence) and temporal quality per shape; about 20 seconds on 2
CPU cores.
"""

from __future__ import annotations

import argparse

import torch

from trl_arcopo.shapes import HELDOUT_PROMPTS, SHAPES, load_pretrained_pipeline, parse_prompt
from trl_arcopo.shapes.evaluation import evaluation_seeds, generate_videos
from trl_arcopo.shapes.rewards import score_videos


KEYS = ("all_correct", "shape", "prominence", "temporal_quality")


def by_shape(prompts, scores):
    """`{shape: {key: mean over that shape's videos}}` for the scores of `score_videos`."""
    shape_of = [parse_prompt(p)[1] for p in prompts]
    out = {}
    for shape in SHAPES:
        mask = torch.tensor([s == shape for s in shape_of])
        out[shape] = {k: scores[k][mask].mean().item() for k in KEYS}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="A LoRA folder saved by the main job.")
    parser.add_argument("--seed", type=int, default=0, help="The main job's --seed (its evaluation uses seed + 1).")
    parser.add_argument("--num_seeds", type=int, default=8, help="Seed sets per held-out prompt (the job's default).")
    args = parser.parse_args()
    pipeline = load_pretrained_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    prompts = [p for _ in range(args.num_seeds) for p in HELDOUT_PROMPTS]
    seeds = evaluation_seeds(len(HELDOUT_PROMPTS), args.num_seeds, args.seed + 1)
    base = by_shape(prompts, score_videos(prompts, generate_videos(pipeline, prompts, seeds)))
    pipeline.load_lora_weights(args.adapter)
    trained = by_shape(prompts, score_videos(prompts, generate_videos(pipeline, prompts, seeds)))
    print("| held-out prompts | " + " | ".join(f"{k}: base → trained" for k in KEYS) + " |")
    print("| --- |" + " --- |" * len(KEYS))
    for shape in SHAPES:
        cells = [f"{base[shape][k]:.3f} → {trained[shape][k]:.3f}" for k in KEYS]
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
