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
"""Evaluate a Moving Shapes generator and turn the results into a table, a video grid and reward curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ..completions import gif_bytes
from .rewards import score_videos


#: The scores reported per video (see `score_videos`); `*_correct` are thresholded at 0.5.
REPORTED = ("colour", "shape", "direction", "temporal_quality", "combined", "all_correct", "prominence")


@torch.no_grad()
def generate_videos(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: str | None = None,
    batch_size: int = 96,
) -> torch.Tensor:
    """
    Videos `[N, F, 3, H, W]` in `[0, 1]`, video `i` from `torch.Generator().manual_seed(seeds[i])`; `sampler=None` is
    the pipeline's `default_sampler`.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt.")
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out.append(pipeline(chunk, generator=generators, output_type="pt", sampler=sampler).frames.float().cpu())
    return torch.cat(out)


def evaluation_seeds(num_prompts: int, num_seeds: int, seed: int = 0) -> list[int]:
    """
    The noise seeds of `num_seeds` seed sets over `num_prompts` prompts, set by set: seed set `s` gives prompt `i` the
    seed `seed * 100_003 + s * 1009 + i` (what [`evaluate_generator`] uses, so other measurements share its noises).
    """
    return [seed * 100_003 + s * 1009 + i for s in range(num_seeds) for i in range(num_prompts)]


def evaluate_generator(
    pipeline,
    prompts: Sequence[str],
    num_seeds: int = 4,
    seed: int = 0,
    sampler: str | None = None,
) -> dict[str, dict[str, float]]:
    """
    Score `num_seeds` videos per prompt (seed set `s` uses seeds `seed * 100_003 + s * 1009 + prompt index`, the same
    for every model, so two models are compared on the same noises). Returns, for each reported score, the mean over
    all videos, the standard deviation of the per-seed-set means (the seed-to-seed spread), those means, and the
    within-prompt standard deviation over seeds averaged over prompts (how much the score varies with the noise alone):
    `{"colour": {"mean": ..., "std": ..., "by_seed": [...], "within_prompt_std": ...}, ...}` with `*_acc` (fraction
    `>= 0.5`) for colour, shape and direction.
    """
    prompts = list(prompts)
    all_prompts = [p for _ in range(num_seeds) for p in prompts]
    seeds = evaluation_seeds(len(prompts), num_seeds, seed)
    videos = generate_videos(pipeline, all_prompts, seeds, sampler=sampler)
    scores = score_videos(all_prompts, videos)
    per_video = {k: scores[k].float() for k in REPORTED}
    for k in ("colour", "shape", "direction"):
        per_video[f"{k}_acc"] = (scores[k] >= 0.5).float()
    result = {}
    for key, values in per_video.items():
        grid = values.view(num_seeds, len(prompts))  # [num_seeds, num_prompts]
        by_seed = grid.mean(dim=1)  # [num_seeds]
        result[key] = {
            "mean": values.mean().item(),
            "std": by_seed.std().item() if num_seeds > 1 else 0.0,
            "by_seed": by_seed.tolist(),
            "within_prompt_std": grid.std(dim=0).mean().item() if num_seeds > 1 else 0.0,
        }
    return result


def format_table(rows: dict[str, dict[str, dict[str, float]]], keys: Sequence[str] | None = None) -> str:
    """A markdown table, one row per name in `rows` (each an `evaluate_generator` result), `mean ± std` cells."""
    keys = list(keys or ["colour_acc", "shape_acc", "direction_acc", "all_correct", "temporal_quality", "combined"])
    lines = ["| | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, result in rows.items():
        cells = [f"{result[k]['mean']:.3f} ± {result[k]['std']:.3f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(before: dict, after: dict, key: str = "combined") -> dict[str, float | list[float]]:
    """
    `after - before` of `key` per evaluation seed set (two `evaluate_generator` results on the same noises): its mean,
    its standard deviation over seed sets, and the base's own seed-to-seed spread, to compare the rise with.
    """
    diffs = torch.tensor(after[key]["by_seed"]) - torch.tensor(before[key]["by_seed"])  # [num_seeds]
    return {
        "mean": diffs.mean().item(),
        "std": diffs.std().item() if len(diffs) > 1 else 0.0,
        "base_spread": before[key]["std"],
        "by_seed": diffs.tolist(),
    }


def save_video_grid(
    path: str | os.PathLike,
    columns: dict[str, torch.Tensor],
    captions: Sequence[str],
    scale: int = 3,
    fps: int = 4,
) -> None:
    """
    An animated GIF: one row per caption, one column per entry of `columns` (each `[N, F, 3, H, W]` in `[0, 1]`, e.g.
    `{"base": ..., "AR-CoPO": ...}`), column titles on top and the caption left of each row.
    """
    from PIL import Image, ImageDraw

    names = list(columns)
    videos = [columns[n].float().clamp(0, 1).cpu() for n in names]
    n, f, _, h, w = videos[0].shape
    if len(captions) != n or any(v.shape != videos[0].shape for v in videos):
        raise ValueError("Every column needs the same shape [N, F, 3, H, W] and one caption per row.")
    cell_h, cell_w, pad, text_w, title_h = h * scale, w * scale, 4, 210, 14
    width = text_w + len(names) * (cell_w + pad)
    height = title_h + n * (cell_h + pad)
    frames = []
    for t in range(f):
        canvas = Image.new("RGB", (width, height), (40, 40, 40))
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(names):
            draw.text((text_w + c * (cell_w + pad), 1), name, fill=(255, 255, 255))
        for r in range(n):
            y = title_h + r * (cell_h + pad)
            draw.text((2, y + cell_h // 2 - 5), captions[r], fill=(220, 220, 220))
            for c, video in enumerate(videos):
                frame = (video[r, t].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
                image = Image.fromarray(frame).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(image, (text_w + c * (cell_w + pad), y))
        frames.append(canvas)
    with open(path, "wb") as f:
        f.write(gif_bytes(frames, fps))


def plot_curves(
    path: str | os.PathLike,
    curves: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
) -> None:
    """A line plot (PNG): `curves[name] = (x, y, y_std or None)`, the std drawn as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (x, y, y_std) in curves.items():
        (line,) = ax.plot(x, y, label=name, marker="o" if len(x) < 30 else None, markersize=3)
        if y_std is not None:
            lo = [a - b for a, b in zip(y, y_std)]
            hi = [a + b for a, b in zip(y, y_std)]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """Trailing moving average (for noisy per-step rewards)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out
