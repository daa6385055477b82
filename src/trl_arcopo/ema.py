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

    def save(self, folder: str) -> None:
        """Write the average to `folder/adapter_ema.safetensors`, atomically."""
        with atomic_path(os.path.join(folder, EMA_FILE)) as tmp:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, tmp)

    def load(self, folder: str) -> None:
        """Read the average saved by [`save`]; its names must be this adapter's."""
        loaded = load_file(os.path.join(folder, EMA_FILE))
        if loaded.keys() != self.shadow.keys():
            missing, unexpected = (
                sorted(self.shadow.keys() - loaded.keys()),
                sorted(loaded.keys() - self.shadow.keys()),
            )
            raise ValueError(
                f"{os.path.join(folder, EMA_FILE)} does not match the adapter (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): resume with the adapter configuration that saved it."
            )
        for name, value in loaded.items():
            self.shadow[name].copy_(value)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the adapter holds the average (cast to its dtype); the trained weights come back on exit."""
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
