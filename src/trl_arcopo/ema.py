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
"""An exponential moving average of the trained adapter, updated after every optimizer step."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .io_utils import atomic_path


#: The EMA's file in a checkpoint folder (float32 tensors under the adapter's PEFT parameter names).
EMA_FILE = "adapter_ema.safetensors"


def summarize_names(names: list[str], limit: int = 3) -> str:
    """`names` for a message: the first `limit` of them and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def nonfinite_ema_names(path: str) -> list[str]:
    """The tensors of the EMA file `path` ([`AdapterEMA.save`]) holding a NaN or an infinity."""
    return [name for name, value in load_file(path).items() if not torch.isfinite(value).all()]


class AdapterEMA(TrainerCallback):
    r"""
    `ema ← decay · ema + (1 - decay) · θ` for every adapter parameter `θ`, in float32, after every optimizer step (a
    `TrainerCallback`: `on_step_end`). The average starts at the adapter's initial weights.

    Args:
        parameters (`dict[str, torch.nn.Parameter]`): the adapter's parameters by PEFT name.
        decay (`float`): in `[0, 1)`; the average spans about `1 / (1 - decay)` steps.
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"`ema_decay={decay}` must be in [0, 1) (e.g. 0.99; None turns the EMA off).")
        self.parameters, self.decay = parameters, decay
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.parameters.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def on_step_end(self, args, state, control, **kwargs):
        self.update()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def nonfinite_names(self) -> list[str]:
        """The names of the averaged parameters holding a NaN or an infinity."""
        return [name for name, value in self.shadow.items() if not torch.isfinite(value).all()]

    def check_finite(self, folder: str) -> None:
        """Raise the `RuntimeError` of [`save`] if the average is not finite (every process calls it before a save)."""
        if bad := self.nonfinite_names():
            raise RuntimeError(
                f"The moving average of the adapter (`ema_decay`) is not finite ({summarize_names(bad)}), so it was "
                f"not saved and {folder} is left incomplete (a resume skips it). Resume from the last complete "
                "checkpoint (`resume_from_checkpoint=True`), or turn the average off (`ema_decay=None`)."
            )

    def save(self, folder: str) -> None:
        """
        Write the average to `folder/adapter_ema.safetensors`, atomically. An average that is not finite is not
        written: a `RuntimeError` names its parameters (the checkpoint being saved stays incomplete, so a resume
        skips it).
        """
        self.check_finite(folder)
        with atomic_path(os.path.join(folder, EMA_FILE)) as tmp:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, tmp)

    def load(self, folder: str) -> None:
        """
        Read the average saved by [`save`]. Its names must be this adapter's, each tensor the shape of the parameter
        it averages, and every value finite: otherwise nothing is loaded and a `ValueError` names each offending
        tensor and the fix.
        """
        path = os.path.join(folder, EMA_FILE)
        loaded = load_file(path)
        problems = []
        missing, unexpected = sorted(self.shadow.keys() - loaded.keys()), sorted(loaded.keys() - self.shadow.keys())
        if missing or unexpected:
            problems.append(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        problems += [
            f"{name} has shape {list(value.shape)}, the parameter {list(self.shadow[name].shape)}"
            for name, value in loaded.items()
            if name in self.shadow and value.shape != self.shadow[name].shape
        ]
        if problems:
            raise ValueError(
                f"{path} does not match the adapter ({'; '.join(problems)}): resume with the adapter configuration "
                "(`peft_config`) that saved it, or from another checkpoint."
            )
        if bad := [name for name, value in loaded.items() if not torch.isfinite(value).all()]:
            raise ValueError(
                f"{path} is not finite ({summarize_names(bad)} hold NaN or infinite values): resume from an earlier checkpoint "
                "(`resume_from_checkpoint=True` skips this one), or start a fresh `output_dir`."
            )
        for name, value in loaded.items():
            self.shadow[name].copy_(value)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """
        Inside, the adapter holds the average (cast to its dtype); the trained weights come back on exit. An average
        that is not finite is refused with a `RuntimeError` naming its parameters (the adapter is left as it is).
        """
        if bad := self.nonfinite_names():
            raise RuntimeError(
                f"The moving average of the adapter (`ema_decay`) is not finite ({summarize_names(bad)}): it cannot be used "
                "for evaluation or the saved model. Resume from the last complete checkpoint "
                "(`resume_from_checkpoint=True`), or set `use_ema_weights=False` to use the last weights."
            )
        live = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(live[name])
