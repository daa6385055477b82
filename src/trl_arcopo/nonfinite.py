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
"""The non-finite policy: an optimizer step with a NaN or infinite value, or a group no reward scored, is skipped,
logged, and stops training."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)


def nonfinite_fix(reason: str) -> str:
    """The fix an error about a non-finite `reason` suggests."""
    if reason.startswith(("reward function", "the weighted sum")):
        return "Fix the reward function (return a finite float, or None for 'no opinion'), or rescale its values."
    if reason.startswith("no candidate"):
        return (
            "A reward gave no score (a remote reward's server failed; its last error is above): fix or restart the "
            "service and resume from the last checkpoint (`resume_from_checkpoint=True`); the skipped steps did not "
            "move the adapter."
        )
    if reason.startswith("the temperature"):
        return "Set `temperature` to a positive number, or None for the automatic choice."
    return (
        "The policy diverged: lower `learning_rate`, set `max_grad_norm`, and resume from the last checkpoint "
        "(`resume_from_checkpoint=True`)."
    )


def check_finite_parameters(named_parameters: dict[str, torch.Tensor], when: str, step: int) -> None:
    """Raise a `RuntimeError` naming the first parameter that is not finite."""
    for name, param in named_parameters.items():
        if not torch.isfinite(param).all():
            raise RuntimeError(
                f"The adapter parameter {name} is not finite {when} (step {step}); nothing was saved. Lower "
                "`learning_rate` or set `max_grad_norm`, and resume from the last checkpoint."
            )


class NonFiniteGuard(TrainerCallback):
    r"""
    Skips the optimizer steps that had a non-finite value or a group that no reward scored. The trainer
    [`~NonFiniteGuard.flag`]s a cause (a rollout, reward, advantage, temperature or loss, or a group without a score); right before the optimizer step the guard adds a non-finite gradient,
    agrees across processes, and on a skip drops the gradients (the optimizer leaves the weights and its state as they
    were), records and warns. After `max_consecutive` consecutive skips it raises a `RuntimeError` naming the causes.
    After every optimizer step it checks that the adapter is finite.

    Args:
        max_consecutive (`int`): consecutive skipped steps tolerated.
        accelerator (`accelerate.Accelerator`): to agree across processes.
        adapter_state (`Callable[[], dict[str, torch.Tensor]]`): the trained parameters, by name.
    """

    def __init__(self, max_consecutive: int, accelerator: Accelerator, adapter_state):
        self.max_consecutive = max_consecutive
        self.accelerator = accelerator
        self.adapter_state = adapter_state
        #: Every skipped optimizer step of this process's run: `{"step": int, "reason": str}`.
        self.skipped_steps: list[dict[str, Any]] = []
        self.window: list[float] = []  # 1.0 per skipped step, 0.0 per taken step, since the last log
        self._pending: str | None = None
        self._consecutive = 0

    def flag(self, reason: str) -> None:
        """Mark the optimizer step being accumulated as skipped; the first cause is the one reported."""
        if self._pending is None:
            self._pending = reason

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = [p for p in model.parameters() if p.requires_grad]
        reason, self._pending = self._pending, None
        if reason is None:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                reason = "the gradient is not finite"
        skip = torch.tensor(float(reason is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            skip = self.accelerator.reduce(skip, reduction="sum")
        self.window.append(float(skip.item() > 0))
        if skip.item() == 0:
            self._consecutive = 0
            return
        reason = reason or "another process found a non-finite value"
        for param in params:
            param.grad = None  # an optimizer skips parameters without a gradient: no update, no state change
        step = state.global_step + 1
        self.skipped_steps.append({"step": step, "reason": reason})
        self._consecutive += 1
        logger.warning(f"Skipped optimizer step {step}: {reason}.")
        if self._consecutive >= self.max_consecutive:
            recent = "; ".join(f"step {s['step']}: {s['reason']}" for s in self.skipped_steps[-self.max_consecutive :])
            raise RuntimeError(
                f"Training stopped: {self.max_consecutive} consecutive optimizer steps (`max_nonfinite_steps="
                f"{self.max_consecutive}`) were skipped because a value was NaN or infinite or a group had no score "
                f"({recent}). The weights and checkpoints hold the last good state. {nonfinite_fix(reason)}"
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        check_finite_parameters(self.adapter_state(), "after the optimizer step", state.global_step)
