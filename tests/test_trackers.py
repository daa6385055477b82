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
`report_to` with each tracker on a 2-step tiny run with `log_completions=True`: training runs (a diffusers config does
not crash transformers' callbacks), and the tracker holds each candidate's video as a GIF and the completions table.
TensorBoard is always tested; wandb (offline), trackio (local) and MLflow (a local store) when installed.
"""

import glob
import io
import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from helpers import tiny_trainer

from trl_arcopo.completions import Completions, encode_gif


def gif_frames(data: bytes) -> list[torch.Tensor]:
    """The frames of a GIF as `[H, W, 3]` uint8 (decoded by PIL)."""
    from PIL import Image, ImageSequence

    image = Image.open(io.BytesIO(data))
    assert image.format == "GIF"
    return [torch.tensor(list(f.convert("RGB").getdata()), dtype=torch.uint8).view(f.height, f.width, 3) for f in ImageSequence.Iterator(image)]  # fmt: skip


def train(tmp_path, tracker, **kwargs):
    trainer = tiny_trainer(tmp_path, report_to=[tracker], log_completions=True, logging_steps=1, **kwargs)
    trainer.train()
    return trainer


def test_completions_table_and_gif():
    videos = torch.arange(2 * 3 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 3, 4, 5) * 2  # [G, F, C, H, W]
    completions = Completions(7, "a | fox", 1, videos, {"r1": [0.5, 1.0], "r2": [float("nan"), 2.0]}, [0.5, 3.0], [-1.0, 1.0])  # fmt: skip
    assert completions.columns == ["step", "prompt", "candidate", "pivot_chunk", "r1", "r2", "reward", "advantage"]
    assert completions.rows()[1] == [7, "a | fox", 1, 1, 1.0, 2.0, 3.0, 1.0]
    markdown = completions.markdown().splitlines()
    assert len(markdown) == 4 and "a \\| fox" in markdown[2] and "nan" in markdown[2]
    frames = gif_frames(encode_gif(videos[1]))
    assert len(frames) == 3 and frames[0].shape == (4, 5, 3)


def test_tensorboard_trains_and_holds_the_videos_the_table_and_the_config(tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = train(tmp_path, "tensorboard", num_completions_to_print=1)
    (events,) = glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))
    accumulator = event_accumulator.EventAccumulator(events, size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert sorted(t for t in tags["images"] if t.startswith("completions/")) == [f"completions/candidate_{i}" for i in range(3)]  # fmt: skip
    image = accumulator.Images("completions/candidate_0")[0]
    frames = gif_frames(image.encoded_image_string)
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3)  # the tiny pipeline's 9 frames of 16x16
    texts = {tag: accumulator.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in tags["tensors"]}
    table = texts["completions/table/text_summary"]
    assert "| step | prompt | candidate | pivot_chunk | redness | reward | advantage |" in table
    assert table.count("\n") == 2 + 3 - 1  # header, rule and one row per candidate
    assert json.loads(texts["model_config/text_summary"])["_class_name"] == "CausalWanTransformer3DModel"
    assert os.path.isfile(tmp_path / "completions" / "step_000000.gif")  # the files on disk stay as they were
    assert "candidate" in capsys.readouterr().out
    assert trainer._completions_folder is None  # the GIFs given to trackers are removed at the end


def test_wandb_offline_holds_the_videos_and_the_table(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path, "wandb")
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    gifs = glob.glob(os.path.join(run, "files", "media", "videos", "completions", "*.gif"))
    assert len(gifs) == 3 and all(len(gif_frames(Path(g).read_bytes())) == 9 for g in gifs)
    (table,) = glob.glob(os.path.join(run, "files", "media", "table", "completions", "*.table.json"))
    content = json.loads(Path(table).read_text())
    assert content["columns"][-3:] == ["redness", "reward", "advantage"] and len(content["data"]) == 3


def test_trackio_locally_holds_the_videos_and_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported, below
    pytest.importorskip("trackio")
    train(tmp_path, "trackio")
    gifs = glob.glob(str(tmp_path / "trackio" / "media" / "**" / "*.gif"), recursive=True)
    (database,) = glob.glob(str(tmp_path / "trackio" / "*.db"))
    logged = [json.loads(row[0]) for row in sqlite3.connect(database).execute("select metrics from metrics")]
    entry = next(m for m in logged if "completions/table" in m)
    assert sorted(k for k in entry if k.startswith("completions/candidate_")) == [f"completions/candidate_{i}" for i in range(3)]  # fmt: skip
    assert len(gifs) == 3 and all(len(gif_frames(Path(g).read_bytes())) == 9 for g in gifs)


def test_mlflow_trains_and_holds_the_videos_and_the_table(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    train(tmp_path, "mlflow")
    (step,) = glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "artifacts" / "completions" / "step_000000"))
    assert len(glob.glob(os.path.join(step, "*.gif"))) == 3
    table = json.loads(Path(step, "table.json").read_text())
    assert table["columns"][-3:] == ["redness", "reward", "advantage"] and len(table["data"]) == 3
    (config,) = glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "artifacts" / "model_config.json"))
    assert json.loads(Path(config).read_text())["_class_name"] == "CausalWanTransformer3DModel"
