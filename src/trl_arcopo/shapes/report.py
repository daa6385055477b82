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
"""The main job's report: base vs trained on the Moving Shapes prompts, as tables, a video grid and reward curves."""

from __future__ import annotations

import json
import os

import torch

from . import evaluation
from .world import HELDOUT_PROMPTS, TRAIN_PROMPTS


#: The scores the report tables show, the preference first.
REPORT_KEYS = ["prominence", "colour_acc", "shape_acc", "direction_acc", "all_correct", "temporal_quality", "combined"]
#: The report's trained − base rows, per evaluation seed set: (name in the table, score key).
REPORTED_DIFFERENCES = (
    ("Preference (prominence)", "prominence"),
    ("All-correct rate", "all_correct"),
    ("Temporal quality", "temporal_quality"),
    ("Combined reward", "combined"),
)


def evaluate_main_job(
    pipeline, seed: int, num_seeds: int = 32, sampler: str | None = None
) -> tuple[dict, torch.Tensor]:
    """
    The main job's measurement of a generator: scores on the RL-training prompts (2 videos each) and the held-out
    prompts (`num_seeds` each) on evaluation seed `seed + 1` (fresh noises, not the training rollouts'), as
    `{"train": ..., "heldout": ...}` of [`evaluate_generator`] results, and [`heldout_samples`].
    """
    scores = {
        "train": evaluation.evaluate_generator(pipeline, TRAIN_PROMPTS, 2, seed=seed + 1, sampler=sampler),
        "heldout": evaluation.evaluate_generator(pipeline, HELDOUT_PROMPTS, num_seeds, seed=seed + 1, sampler=sampler),
    }
    return scores, heldout_samples(pipeline, sampler)


def heldout_samples(pipeline, sampler: str | None = None) -> torch.Tensor:
    """One video per held-out prompt, seeds 0..11: the report's `samples.gif`. `[12, F, C, H, W]`."""
    return evaluation.generate_videos(pipeline, HELDOUT_PROMPTS, list(range(len(HELDOUT_PROMPTS))), sampler=sampler)


def difference_rows(before: dict, after: dict) -> list[str]:
    """Markdown rows: trained − base per seed set, its mean ± std, the base's spread and their ratio."""
    rows = ["| trained − base | per seed set | mean ± std | base spread | mean / spread |", "| --- |" + " --- |" * 4]
    for name, key in REPORTED_DIFFERENCES:
        diff = evaluation.paired_difference(before, after, key=key)
        per_seed = ", ".join(f"{d:+.3f}" for d in diff["by_seed"])
        ratio = diff["mean"] / diff["base_spread"] if diff["base_spread"] > 0 else float("nan")
        rows.append(
            f"| {name} | {per_seed} | {diff['mean']:+.3f} ± {diff['std']:.3f} | {diff['base_spread']:.3f} | "
            f"{ratio:+.1f}× |"
        )
    return rows


def write_report(
    output_dir: str,
    before: tuple[dict, torch.Tensor],
    after: tuple[dict, torch.Tensor],
    log_history: list[dict],
    reward_names: list[str],
) -> str:
    """
    Write the report of a base (`before`) and a trained (`after`) [`evaluate_main_job`]: `eval_results.json`,
    `eval_table.md` (per split: every score of both models, then [`difference_rows`] and the base's within-prompt std
    of the preference), `samples.gif` (held-out prompts, base vs trained) and `reward_curve.png` (each reward's
    training mean per step, from `log_history`, logged under `reward_names`). Returns the table.
    """
    (before, videos_before), (after, videos_after) = before, after
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
        json.dump({"base": before, "trained": after}, f, indent=2)
    lines = ["# Moving Shapes: base vs AR-CoPO", ""]
    for split, title in (("train", "RL-training prompts (60)"), ("heldout", "held-out prompts (12)")):
        table = evaluation.format_table({"base": before[split], "AR-CoPO": after[split]}, keys=REPORT_KEYS)
        lines += [f"## {title}", "", table, "", *difference_rows(before[split], after[split])]
        noise = before[split]["prominence"].get("within_prompt_std")
        if noise is not None:
            lines += ["", f"The base's preference varies with the initial noise alone: within-prompt std over seeds {noise:.3f}."]  # fmt: skip
        lines.append("")
    lines.append(
        "mean ± std over evaluation seed sets (the same noises for both models); `*_acc` are the fractions of videos "
        "scoring ≥ 0.5; `prominence` is the preference the job trains for (`trl_arcopo.shapes.prominence_reward`)."
    )
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "eval_table.md"), "w") as f:
        f.write(table + "\n")
    grid = {"base": videos_before, "AR-CoPO": videos_after}
    evaluation.save_video_grid(os.path.join(output_dir, "samples.gif"), grid, list(HELDOUT_PROMPTS))
    steps = [h["step"] for h in log_history if "reward" in h]
    curves = {}  # each reward on its own scale ([0, 1] for the Moving Shapes rewards), not their weighted sum
    for name in reward_names:
        values = [h[f"rewards/{name}/mean"] for h in log_history if f"rewards/{name}/mean" in h]
        if len(values) == len(steps):
            curves[name.replace("_reward", "")] = (steps, evaluation.smooth(values), None)
    if not curves:
        curves["reward"] = (steps, evaluation.smooth([h["reward"] for h in log_history if "reward" in h]), None)
    title = "training reward (moving average of 5 steps)"
    evaluation.plot_curves(
        os.path.join(output_dir, "reward_curve.png"), curves, "step", title, "AR-CoPO on Moving Shapes"
    )
    return table
