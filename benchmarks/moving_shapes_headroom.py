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
How much room the initial noise leaves on Moving Shapes, and where an adapter's effect comes from.

    python benchmarks/moving_shapes_headroom.py                                      # best-of-N of the shipped model
    python benchmarks/moving_shapes_headroom.py --adapter outputs/arcopo-moving-shapes --num_adapter_chunks 1

1. Best-of-N: for every prompt, `--heldout_seeds` (training prompts: `--train_seeds`) videos of the shipped model from
   independent noises; the combined reward averaged over all of them, and of the best video of each disjoint block
   of N. A policy that always found the best of N noises would score the best-of-N value: group-relative RL on
   G candidates pulls the policy toward that, so best-of-G bounds what it can reach without leaving the base's
   support.
2. With `--adapter` (a LoRA saved by `ARCoPOTrainer`): base, the adapter on every chunk, and the adapter on the first
   `--num_adapter_chunks` chunks only (the later chunks by the base, continuing from the adapted ones), on the same
   noises as `examples/train_arcopo.py`'s evaluation (its seed sets for `--seed 0`). The gap between the last two
   is the share of the adapter's effect that comes from chunks the on-policy update never trained (pivot 0).

Prints markdown tables; about 1 minute on 2 CPU cores (2.5 with `--adapter`).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from trl_arcopo.shapes import HELDOUT_PROMPTS, TRAIN_PROMPTS, load_pretrained_pipeline
from trl_arcopo.shapes.evaluation import evaluate_generator, evaluation_seeds, generate_videos, paired_difference
from trl_arcopo.shapes.rewards import score_videos


def best_of_n(pipeline, prompts, num_seeds, seed=1):
    """`{"mean": ..., "best_of_2": ..., ...}`: the combined reward of all videos and of the best of each block of N."""
    prompts = list(prompts)
    all_prompts = [p for _ in range(num_seeds) for p in prompts]
    seeds = evaluation_seeds(len(prompts), num_seeds, seed)
    combined = score_videos(all_prompts, generate_videos(pipeline, all_prompts, seeds))["combined"]
    combined = combined.view(num_seeds, len(prompts))  # [S, P]
    result = {"mean": combined.mean().item()}
    n = 2
    while n <= num_seeds:
        blocks = combined[: (num_seeds // n) * n].view(num_seeds // n, n, len(prompts))  # [S // n, n, P]
        result[f"best_of_{n}"] = blocks.amax(dim=1).mean().item()
        n *= 2
    return result


class FirstChunksAdapter:
    """
    The pipeline with its LoRA on the first `num_chunks` chunks only (a callable with the pipeline's interface, for
    `generate_videos`): the adapters are switched off once chunk `num_chunks - 1` is committed, and on again after.
    """

    def __init__(self, pipeline, num_chunks):
        self.pipeline, self.num_chunks = pipeline, num_chunks

    def _chunk_end(self, pipeline, chunk_index):
        if chunk_index == self.num_chunks - 1:
            pipeline.transformer.disable_adapters()

    def __call__(self, prompts, **kwargs):
        try:
            return self.pipeline(prompts, callback_on_chunk_end=self._chunk_end, **kwargs)
        finally:
            self.pipeline.transformer.enable_adapters()


def format_rows(rows, keys):
    lines = ["| | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(values.get(k, "") for k in keys) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout_seeds", type=int, default=16, help="Videos per held-out prompt for best-of-N.")
    parser.add_argument("--train_seeds", type=int, default=4, help="Videos per training prompt for best-of-N.")
    parser.add_argument("--adapter", default=None, help="A LoRA folder (pytorch_lora_weights.safetensors) to split.")
    parser.add_argument("--num_adapter_chunks", type=int, default=1, help="Chunks the split adapter acts on.")
    parser.add_argument("--eval_num_seeds", type=int, default=8, help="Held-out seed sets of the adapter split.")
    args = parser.parse_args()
    if args.num_adapter_chunks < 1:
        parser.error(f"--num_adapter_chunks={args.num_adapter_chunks} must be at least 1.")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    torch.manual_seed(0)
    pipeline = load_pretrained_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    config = pipeline.config
    frames_per_chunk = getattr(config, "default_num_frames_per_chunk", 3)
    latent_frames = pipeline.latent_shape(
        1, config.default_height, config.default_width, config.default_num_frames, frames_per_chunk
    )[2]
    num_chunks = latent_frames // frames_per_chunk
    if args.adapter is not None and args.num_adapter_chunks >= num_chunks:
        parser.error(
            f"--num_adapter_chunks={args.num_adapter_chunks} must be below the {num_chunks} chunks a video has."
        )

    rows = {}
    for name, prompts, seeds in (
        (f"held-out ({len(HELDOUT_PROMPTS)} × {args.heldout_seeds})", HELDOUT_PROMPTS, args.heldout_seeds),
        (f"training ({len(TRAIN_PROMPTS)} × {args.train_seeds})", TRAIN_PROMPTS, args.train_seeds),
    ):
        rows[name] = {k: f"{v:.3f}" for k, v in best_of_n(pipeline, prompts, seeds).items()}
    keys = sorted({k for r in rows.values() for k in r}, key=lambda k: (k != "mean", len(k), k))
    print("## Combined reward of the shipped model: all videos vs the best of N independent noises\n")
    print(format_rows(rows, keys) + "\n", flush=True)
    if args.adapter is None:
        return

    def evaluate(model):
        return {
            "train": evaluate_generator(model, TRAIN_PROMPTS, 2, seed=1),
            "heldout": evaluate_generator(model, HELDOUT_PROMPTS, args.eval_num_seeds, seed=1),
        }

    results = {"base": evaluate(pipeline)}
    pipeline.load_lora_weights(args.adapter)
    results["adapter, every chunk"] = evaluate(pipeline)
    results[f"adapter, first {args.num_adapter_chunks} chunk(s)"] = evaluate(
        FirstChunksAdapter(pipeline, args.num_adapter_chunks)
    )
    metrics = ("combined", "all_correct", "shape", "temporal_quality")
    for split, title in (
        ("train", "training prompts (60 × 2)"),
        ("heldout", f"held-out (12 × {args.eval_num_seeds})"),
    ):
        table = {}
        for name, result in results.items():
            table[name] = {}
            for key in metrics:
                cell = f"{result[split][key]['mean']:.3f}"
                if name != "base":
                    diff = paired_difference(results["base"][split], result[split], key)
                    cell += f" ({diff['mean']:+.3f} ± {diff['std']:.3f})"
                table[name][key] = cell
        print(f"## {args.adapter} on {title}: value (trained − base, mean ± std over seed sets)\n")
        print(format_rows(table, metrics) + "\n", flush=True)


if __name__ == "__main__":
    main()
