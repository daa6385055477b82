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
"""Groups split over processes (`split_groups_across_processes`): a process's share, and the whole group gathered."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from .rewards.base import GroupRewards


if TYPE_CHECKING:
    from accelerate import Accelerator

    from .rewards import RewardScorer
    from .rollout_group import RolloutGroup


def check_split_groups(num_generations: int, num_anchors: int, num_processes: int) -> None:
    """Refuse a group or anchors that do not split evenly over the processes, naming the value and the fix."""
    for name, value in (("num_generations", num_generations), ("num_anchors", num_anchors)):
        if value % num_processes:
            raise ValueError(
                f"`split_groups_across_processes=True` splits `{name}={value}` over {num_processes} processes: use a "
                f"multiple of {num_processes}, or set `split_groups_across_processes=False`."
            )


def process_share(size: int, rank: int, num_processes: int) -> slice:
    """Process `rank`'s share of `size` items split evenly over `num_processes` (contiguous, in rank order)."""
    return slice(rank * size // num_processes, (rank + 1) * size // num_processes)


def gather_group(
    accelerator: Accelerator, group: RolloutGroup, rewards: GroupRewards, nonfinite: str | None, scorer: RewardScorer,
    args,
) -> tuple[RolloutGroup, GroupRewards]:  # fmt: skip
    """
    The whole group from every process's share (`group` and its `rewards` hold this process's `G / n` candidates of
    every prompt): the states, the predictions and each reward function's opinions gathered in process order (the
    candidates' order in one process), and the rewards combined over it
    ([`GroupRewards.from_per_func`]). `nonfinite` is this process's reason the group cannot train, if any; the
    first one of any process is the group's. Every process gets the same group and rewards; the videos stay where
    they were made.
    """
    n = group.num_generations

    def gather(t: torch.Tensor) -> torch.Tensor:  # [N, n, *] of each process -> [N, G, *]
        return accelerator.gather(t.transpose(0, 1).contiguous()).transpose(0, 1)

    group.states, group.x0_preds = gather(group.states), gather(group.x0_preds)
    per_func = gather(rewards.per_func.to(accelerator.device).unflatten(0, (-1, n))).flatten(0, 1).cpu()
    nonfinite = next((reason for reason in gather_object([nonfinite]) if reason is not None), None)
    whole = GroupRewards.from_per_func(
        per_func, scorer.weights, args.num_generations, scorer.aggregation, scorer.funcs, nonfinite, rewards.seconds,
        rewards.seconds_per_func,
    )  # fmt: skip
    return group, whole
