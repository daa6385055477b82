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
What `log_completions` shows of a rollout: one group's candidate videos and a table of their prompt, pivot chunk,
rewards and advantages, on the console (as TRL's completions table) and in each tracker of `report_to`: TensorBoard
(animated GIF image summaries and a markdown table), wandb (`wandb.Video`, `wandb.Table`), trackio (`trackio.Video`,
`trackio.Table`) and MLflow (GIF artifacts and `mlflow.log_table`). No tracker needs `moviepy`: videos are written as
GIFs with PIL.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
from transformers.utils import logging

from .rewards.frames import quantize_8bit


logger = logging.get_logger(__name__)

#: Frames per second of the logged GIFs (as the GIFs of `output_dir/completions/`).
GIF_FPS = 10


def encode_gif(video: torch.Tensor, fps: int = GIF_FPS) -> bytes:
    """An animated GIF of `video` `[F, C, H, W]` (uint8, or float in `[0, 1]`), looping, `fps` frames per second."""
    from PIL import Image

    if video.dtype != torch.uint8:
        video = quantize_8bit(video).to(torch.uint8)
    array = video.permute(0, 2, 3, 1).cpu().numpy()  # [F, H, W, C]
    return gif_bytes([Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame) for frame in array], fps)


def gif_bytes(frames: list, fps: int = GIF_FPS) -> bytes:
    """An animated GIF of the PIL images `frames`, looping, `fps` frames per second: every GIF the library writes."""
    out = io.BytesIO()
    frames[0].save(
        out, format="GIF", save_all=True, append_images=frames[1:], optimize=False, duration=1000 // fps, loop=0
    )
    return out.getvalue()


@dataclass
class Completions:
    r"""
    One group of a rollout, as the trainer logs it.

    Args:
        step (`int`): the optimizer step the rollout was made at.
        prompt (`str`): the group's prompt.
        pivot (`int`): the pivot chunk whose noise the candidates perturb.
        videos (`torch.Tensor` of shape `[G, F, C, H, W]`, uint8): the candidates' videos (this process's candidates).
        rewards (`dict[str, list[float]]`): each reward function's value per candidate (NaN: no opinion).
        reward (`list[float]`): the combined reward per candidate.
        advantages (`list[float]`): the advantage per candidate.
    """

    step: int
    prompt: str
    pivot: int
    videos: torch.Tensor
    rewards: dict[str, list[float]]
    reward: list[float]
    advantages: list[float]

    @property
    def columns(self) -> list[str]:
        return ["step", "prompt", "candidate", "pivot_chunk", *self.rewards, "reward", "advantage"]

    def rows(self) -> list[list]:
        """The table: one row per candidate, in `columns` order."""
        return [
            [self.step, self.prompt, i, self.pivot, *(values[i] for values in self.rewards.values()),
             self.reward[i], self.advantages[i]]
            for i in range(len(self.reward))
        ]  # fmt: skip

    def markdown(self) -> str:
        """The table in markdown (TensorBoard's text plugin renders it)."""
        cells = [
            [f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|") for v in row] for row in self.rows()
        ]
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])

    def print(self, num: int | None = None) -> None:
        """The first `num` rows (all with `None`) on the console, as a rich table when `rich` is installed."""
        rows = self.rows()[:num] if num is not None else self.rows()
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            logger.info(f"Completions at step {self.step}:\n{self.markdown()}")
            return
        table = Table(title=f"Completions at step {self.step}", show_lines=False)
        for column in self.columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
        Console().print(table)


def log_to_trackers(completions: Completions, report_to: list[str], folder: str, tensorboard_writer=None) -> None:
    """
    Log `completions` to each tracker of `report_to` that supports media: TensorBoard (through `tensorboard_writer`,
    the `SummaryWriter` of transformers' callback), wandb, trackio and MLflow (through their active runs). The GIFs
    these take by path are written to `folder` (a temporary folder the trainer owns). A tracker that fails is warned
    about, never fatal.
    """
    gifs = [encode_gif(video) for video in completions.videos]
    paths = []
    if any(name in report_to for name in ("wandb", "trackio", "mlflow")):
        os.makedirs(folder, exist_ok=True)
        for i, gif in enumerate(gifs):
            paths.append(os.path.join(folder, f"step_{completions.step:06d}_candidate_{i}.gif"))
            with open(paths[-1], "wb") as f:
                f.write(gif)
    writers = {
        "tensorboard": lambda: _tensorboard(completions, gifs, tensorboard_writer),
        "wandb": lambda: _wandb(completions, paths),
        "trackio": lambda: _trackio(completions, paths),
        "mlflow": lambda: _mlflow(completions, paths),
    }
    for name, write in writers.items():
        if name in report_to:
            try:
                write()
            except Exception as error:  # noqa: BLE001 - a tracker's failure must not stop training
                logger.warning(f"Could not log the completions of step {completions.step} to {name}: {error!r}")


def _caption(completions: Completions, i: int) -> str:
    rewards = ", ".join(f"{name}={values[i]:.4g}" for name, values in completions.rewards.items())
    return f"{completions.prompt} | candidate {i} | {rewards} | advantage {completions.advantages[i]:.4g}"


def _tensorboard(completions: Completions, gifs: list[bytes], writer) -> None:
    if writer is None:
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    _, _, _, height, width = completions.videos.shape
    values = [
        Summary.Value(
            tag=f"completions/candidate_{i}",
            image=Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif),
        )
        for i, gif in enumerate(gifs)
    ]
    # `add_video` needs moviepy to encode the same GIF image summary, and `add_image` writes a still PNG: the summary
    # is built here and written with the writer's own file writer.
    writer._get_file_writer().add_summary(Summary(value=values), completions.step)
    writer.add_text("completions/table", completions.markdown(), completions.step)
    writer.flush()


def _wandb(completions: Completions, paths: list[str]) -> None:
    import wandb

    if wandb.run is None:
        return
    videos = [wandb.Video(path, caption=_caption(completions, i), format="gif") for i, path in enumerate(paths)]
    table = wandb.Table(columns=completions.columns, data=completions.rows())
    wandb.run.log({"completions/videos": videos, "completions/table": table, "train/global_step": completions.step})


def _trackio(completions: Completions, paths: list[str]) -> None:
    import trackio

    media = {
        f"completions/candidate_{i}": trackio.Video(path, caption=_caption(completions, i), format="gif")
        for i, path in enumerate(paths)
    }
    table = trackio.Table(columns=completions.columns, data=completions.rows())
    trackio.log({**media, "completions/table": table}, step=completions.step)


def _mlflow(completions: Completions, paths: list[str]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    folder = f"completions/step_{completions.step:06d}"
    for path in paths:
        mlflow.log_artifact(path, artifact_path=folder)
    columns = completions.columns
    mlflow.log_table(
        {c: [row[j] for row in completions.rows()] for j, c in enumerate(columns)}, f"{folder}/table.json"
    )
