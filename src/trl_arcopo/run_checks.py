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
The rules a run's group and batch settings obey, written once: `ARCoPOConfig` checks them when it is built and the
planner's `RunSettings` when a plan is made. Torch-free; each error names the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


#: The sub-batch knobs: a positive number of items per forward, or `None` for all at once.
SUB_BATCH_FIELDS = ("rollout_batch_size", "anchor_batch_size", "decode_batch_size")


def check_group_settings(
    num_generations: int,
    num_anchors: int,
    num_iterations: int,
    per_device_train_batch_size: int,
    beta: float,
    train_denoising_steps: Sequence[int] | None = None,
    **sub_batches: int | None,
) -> None:
    """
    Refuse a group of fewer than 2 candidates, anchors outside `[1, num_generations]`, no inner update, no prompt per
    step, a negative or infinite `beta`, trained steps that are not distinct indices, or a sub-batch knob
    ([`SUB_BATCH_FIELDS`], given by name in `sub_batches`) that is not a positive integer or `None`.
    """
    if num_generations < 2:
        raise ValueError(
            f"`num_generations={num_generations}`: a group needs at least 2 candidates to have advantages; "
            "set `num_generations >= 2` (paper: 12)."
        )
    if not 1 <= num_anchors <= num_generations:
        raise ValueError(
            f"`num_anchors={num_anchors}` must be between 1 and `num_generations={num_generations}` "
            "(anchors are drawn among the candidates); lower `num_anchors` or raise `num_generations`."
        )
    for name, value in sub_batches.items():
        if name not in SUB_BATCH_FIELDS:
            raise TypeError(f"`{name}` is not a sub-batch setting; those are {SUB_BATCH_FIELDS}.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{name}={value!r}` must be a positive integer or None (no sub-batches).")
    if num_iterations < 1:
        raise ValueError(f"`num_iterations={num_iterations}` must be at least 1 (paper: 2).")
    if per_device_train_batch_size < 1:
        raise ValueError(
            f"`per_device_train_batch_size={per_device_train_batch_size}` is the number of prompts per step and "
            "process: set it to at least 1."
        )
    if not 0 <= beta < math.inf:
        raise ValueError(f"`beta={beta}` must be non-negative and finite (0: no penalty).")
    if train_denoising_steps is not None:
        steps = list(train_denoising_steps)
        if not steps or any(j < 0 for j in steps) or len(set(steps)) != len(steps):
            raise ValueError(
                f"`train_denoising_steps={steps}` must be a non-empty list of distinct step indices (>= 0, "
                "0 = the step from pure noise), or None for every step."
            )
