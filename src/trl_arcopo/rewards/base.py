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
Reward functions: their type, calling every function on a group's videos with validation, and combining the results
into one reward per video. No trainer imports.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Executor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..loss import check_aggregation
from ..quantization import quantized_parameters
from .daemon_pool import DaemonThreadPool
from .remote import quoted


#: A reward function: `fn(prompts, videos, **kwargs) -> list[float | None]`, with `videos` `[N, F, C, H, W]` in
#: `[0, 1]`, one value per video; `None` means "no opinion". Extra dataset columns arrive as keyword lists.
RewardFunc = Callable[..., list[float | None]]


def reward_func_name(func: RewardFunc) -> str:
    """The name a reward function is logged under (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", type(func).__name__)


def check_reward_funcs(
    reward_funcs: RewardFunc | Sequence[RewardFunc], reward_weights: Sequence[float] | None = None
) -> tuple[list[RewardFunc], torch.Tensor]:
    """The functions as a list and their weights `[n_funcs]` (1.0 each by default), or a `ValueError` naming the fix."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs or not all(callable(f) for f in funcs):
        raise ValueError("`reward_funcs` must be a callable or a non-empty list of callables.")
    if reward_weights is not None and len(reward_weights) != len(funcs):
        raise ValueError(
            f"`reward_weights` has {len(reward_weights)} values but there are {len(funcs)} reward functions "
            f"({', '.join(reward_func_name(f) for f in funcs)}); give one weight per function."
        )
    return funcs, torch.tensor(reward_weights or [1.0] * len(funcs), dtype=torch.float32)


@dataclass
class GroupRewards:
    r"""
    The rewards of `N` groups of `G` videos.

    Args:
        per_func (`torch.Tensor` of shape `[N * G, n_funcs]`): each function's values in float64, NaN where it had no
            opinion (or returned a non-finite value).
        combined (`torch.Tensor` of shape `[N, G]`): what the advantages are computed from, float64: the weighted sum,
            or with `"normalize_then_sum"` the weighted sum of the rewards standardised within each group.
        seconds (`float`): wall time of the scoring.
        nonfinite (`str`, *optional*): which function returned NaN or an infinity, for which video, or whether the
            weighted sum overflowed; `None` when every value is finite.
        seconds_per_func (`list[float]`): time spent in each function.
        weighted_sum (`torch.Tensor` of shape `[N, G]`, *optional*): the plain weighted sum (logged as `reward`);
            `None` when it is `combined`.
    """

    per_func: torch.Tensor
    combined: torch.Tensor
    seconds: float
    nonfinite: str | None = None
    seconds_per_func: list[float] = field(default_factory=list)
    weighted_sum: torch.Tensor | None = None

    @classmethod
    def from_per_func(
        cls,
        per_func: torch.Tensor,
        reward_weights: torch.Tensor,
        num_generations: int,
        aggregation: str,
        reward_funcs: Sequence[RewardFunc],
        nonfinite: str | None = None,
        seconds: float = 0.0,
        seconds_per_func: list[float] | None = None,
    ) -> GroupRewards:
        """
        The rewards of the opinions `per_func` `[N * G, n_funcs]` ([`combine_rewards`] with `aggregation`), and why
        they cannot train (`nonfinite`, or an overflowing weighted sum).
        """
        weighted_sum = combine_rewards(per_func, reward_weights, num_generations)  # [N, G]
        if nonfinite is None and not torch.isfinite(weighted_sum).all():
            largest = per_func.abs().nan_to_num(0.0).amax(dim=0)  # [n_funcs]
            nonfinite = (
                "the weighted sum of the rewards overflowed (largest |value| per function: "
                + ", ".join(f"{reward_func_name(f)}={v:.3g}" for f, v in zip(reward_funcs, largest.tolist()))
                + ")"
            )
        if aggregation == "sum_then_normalize":
            combined, weighted_sum = weighted_sum, None
        else:
            combined = combine_rewards(per_func, reward_weights, num_generations, aggregation)  # [N, G]
        seconds_per_func = seconds_per_func if seconds_per_func is not None else [0.0] * per_func.shape[1]
        return cls(per_func, combined, seconds, nonfinite, seconds_per_func, weighted_sum)

    def metrics(self, names: Sequence[str]) -> dict[str, float]:
        """
        `rewards/<name>/mean` and `/std` over the videos each function had an opinion on, `timing/rewards/<name>` (the
        seconds in each function), the wall time of the scoring, and with `"normalize_then_sum"` the plain weighted
        sum's `reward` and `reward_std` (not the standardised values the advantages come from).
        """
        out = {"timing/reward_seconds": self.seconds}
        for name, column, seconds in zip(names, self.per_func.T, self.seconds_per_func):
            opinions = column[~column.isnan()]
            out[f"rewards/{name}/mean"] = opinions.mean().item() if opinions.numel() else math.nan
            out[f"rewards/{name}/std"] = opinions.std().item() if opinions.numel() > 1 else math.nan
            out[f"timing/rewards/{name}"] = seconds
        if self.weighted_sum is not None:
            out["reward"] = self.weighted_sum.nanmean().item()
            out["reward_std"] = self.weighted_sum.std(dim=1).nanmean().item()
        return out


def _timed_call(func: RewardFunc, prompts: list[str], videos: torch.Tensor, kwargs: dict[str, Any]):
    start = time.perf_counter()
    values = func(prompts=prompts, videos=videos, **kwargs)
    return values, time.perf_counter() - start


def check_rewards(values: Any, n: int) -> list[float | None]:
    """`values` (what a reward function returned for `n` videos) as JSON-ready floats and `None`s, or a `ValueError`
    saying what is wrong: not a sequence, the wrong length, or a value that is not a real number (or does not fit a
    float, like `10**400`)."""
    try:
        count = len(values)
    except TypeError:
        raise ValueError(
            f"returned {quoted(repr(values), 100)} ({type(values).__name__}) for {n} videos: return a list of one "
            "float (or None) per video"
        ) from None
    if count != n:
        raise ValueError(f"returned {count} values for {n} videos: return one float (or None) per video")
    out = []
    for j, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not (
            isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)
        ):
            raise ValueError(
                f"returned {quoted(repr(value), 100)} ({type(value).__name__}) for video {j}: return a float or None"
            )
        try:
            out.append(float(value))
        except (OverflowError, ValueError, TypeError) as error:
            raise ValueError(f"returned {quoted(repr(value), 100)} for video {j}, not a float ({error})") from None
    return out


def call_reward_funcs(
    reward_funcs: Sequence[RewardFunc],
    inputs: list[dict[str, Any]],
    videos: torch.Tensor,
    num_generations: int,
    executor: Executor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, str | None, list[float]]:
    """
    Call every reward function once on all videos: `videos` `[N * G, F, C, H, W]` of the `N` rows `inputs` (dicts
    with a `"prompt"`; other keys reach the functions as keyword lists, repeated per video, next to `kwargs`). With an
    `executor` (e.g. a `ThreadPoolExecutor`), the functions run concurrently; the values do not depend on it.

    Returns the values `[N * G, n_funcs]` in float64 (`None` becomes NaN); if a function returned NaN or an infinity,
    which one and for which video (else `None`); and the seconds spent in each function. A wrong number of values or
    a value that is not a number raises a `ValueError` naming the function and the prompt.
    """
    prompts = [row["prompt"] for row in inputs for _ in range(num_generations)]
    columns = {k: [row[k] for row in inputs for _ in range(num_generations)] for k in inputs[0] if k != "prompt"}
    arguments = {**kwargs, **columns}
    if executor is None:
        results = [_timed_call(func, prompts, videos, arguments) for func in reward_funcs]
    else:
        futures = [executor.submit(_timed_call, func, prompts, videos, arguments) for func in reward_funcs]
        wait(futures, return_when=FIRST_EXCEPTION)  # a failure is raised at once, not after the slower functions
        for future in futures:
            if future.done() and future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()
        results = [future.result() for future in futures]
    out = torch.full((len(prompts), len(reward_funcs)), math.nan, dtype=torch.float64)
    nonfinite = None
    for i, (func, (values, _)) in enumerate(zip(reward_funcs, results)):
        name = reward_func_name(func)
        try:
            values = check_rewards(values, len(prompts))
        except ValueError as error:
            raise ValueError(f"Reward function `{name}` {error} (prompt {prompts[0]!r}, ...).") from None
        for j, value in enumerate(values):
            if value is None:
                continue
            if not math.isfinite(value):
                if nonfinite is None:
                    nonfinite = (
                        f"reward function `{name}` returned {value} for video {j} of prompt {prompts[j]!r} "
                        "(rewards must be finite; return None for 'no opinion')"
                    )
                continue
            out[j, i] = value
    return out, nonfinite, [seconds for _, seconds in results]


def unscored_groups(per_func: torch.Tensor, num_generations: int, reward_funcs: Sequence[RewardFunc]) -> str | None:
    """
    Why the groups of `per_func` `[N * G, n_funcs]` cannot train when one of them has no candidate that any function
    scored (all `None`: a remote reward whose requests failed), naming each function's failures and last error;
    `None` when every group has a scored candidate. Such a group has no advantage, so its step would move the adapter
    on optimizer momentum alone.
    """
    scored = ~per_func.isnan().all(dim=1)  # [N * G]
    unscored = ~scored.view(-1, num_generations).any(dim=1)  # [N]
    if not unscored.any():
        return None
    details = [
        f"reward `{reward_func_name(f)}`: {f.failures} videos failed so far, last error: {f.last_error}"
        for f in reward_funcs
        if getattr(f, "last_error", None) is not None
    ]
    return (
        f"no candidate of {int(unscored.sum())} of {len(unscored)} groups was scored by any reward function ("
        + ("; ".join(details) or "every function returned None")
        + ")"
    )


def normalize_per_group(rewards_per_func: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """
    Each function's values standardised within each group, `[N * G, n_funcs]` -> same shape: `(r - mean) / (std +
    eps)` over the group's opinions (NaN stays NaN), so that every reward moves the advantages on the same scale
    whatever its units (GDPO, TRL's `"normalize_then_sum"`). A group of one video gets 0.
    """
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # [N, G, n_funcs]
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # [N, 1, n_funcs]
    if num_generations > 1:
        count = (~grouped.isnan()).sum(dim=1, keepdim=True)
        variance = torch.nansum((grouped - mean) ** 2, dim=1, keepdim=True) / (count - 1).clamp_min(1)
        std = variance.sqrt()
    else:
        std = torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view_as(rewards_per_func)


def combine_rewards(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """
    Weighted sum over the functions that gave an opinion, `[N * G, n_funcs] -> [N, G]` in the dtype of
    `rewards_per_func` (float64 keeps sums of large rewards finite); with `aggregation="normalize_then_sum"`, of the
    values standardised within each group first ([`normalize_per_group`]). A video without any opinion gets its
    group's mean (zero advantage); a group without any opinion gets 0.
    """
    check_aggregation(aggregation)
    if aggregation == "normalize_then_sum":
        rewards_per_func = normalize_per_group(rewards_per_func, num_generations)
    weights = weights.to(rewards_per_func.device, rewards_per_func.dtype)
    combined = torch.nansum(rewards_per_func * weights, dim=1)  # [N * G]
    grouped = combined.view(-1, num_generations)  # [N, G]
    no_opinion = rewards_per_func.isnan().all(dim=1).view_as(grouped)  # [N, G]
    if no_opinion.any():
        grouped = grouped.masked_fill(no_opinion, math.nan)
        fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)  # [N, 1]
        grouped = torch.where(no_opinion, fill.expand_as(grouped), grouped)
    return grouped


def score_group(
    reward_funcs: Sequence[RewardFunc],
    reward_weights: torch.Tensor,
    inputs: list[dict[str, Any]],
    videos: torch.Tensor | None,
    num_generations: int,
    aggregation: str = "sum_then_normalize",
    executor: Executor | None = None,
    **kwargs,
) -> GroupRewards:
    """
    Score the `N * G` videos of `N` groups: every function called once ([`call_reward_funcs`], concurrently with an
    `executor`), then combined ([`combine_rewards`] with `aggregation`). `videos=None` (a rollout that is not finite)
    asks no function and gives NaN opinions.
    """
    start = time.perf_counter()
    n = len(inputs) * num_generations
    if videos is None:
        per_func, nonfinite = torch.full((n, len(reward_funcs)), math.nan, dtype=torch.float64), None
        seconds_per_func = [0.0] * len(reward_funcs)
    else:
        per_func, nonfinite, seconds_per_func = call_reward_funcs(
            reward_funcs, inputs, videos, num_generations, executor, **kwargs
        )
    seconds = time.perf_counter() - start
    return GroupRewards.from_per_func(
        per_func, reward_weights, num_generations, aggregation, reward_funcs, nonfinite, seconds, seconds_per_func
    )


def reward_modules(func: RewardFunc) -> list[torch.nn.Module]:
    """The torch modules a reward function holds: its attributes that are modules, and theirs one level down."""
    found = []
    for value in getattr(func, "__dict__", {}).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            found.extend(v for v in vars(value).values() if isinstance(v, torch.nn.Module))
    return found


class RewardScorer:
    """
    The reward functions of a run, their weights and how they are combined: `start(...)` scores a rollout's videos
    now, or with `async_rewards=True` in a background thread (the functions concurrently with each other, in a pool
    of `num_workers` threads, one per function plus one by default), and returns the function that waits for the
    [`GroupRewards`]. The values never depend on the mode. The threads are daemons ([`DaemonThreadPool`]); the
    trainer closes them when training ends or fails.
    """

    def __init__(self, reward_funcs: RewardFunc | Sequence[RewardFunc], reward_weights: Sequence[float] | None = None,
                 aggregation: str = "sum_then_normalize", async_rewards: bool = False,
                 num_workers: int | None = None):  # fmt: skip
        self.funcs, self.weights = check_reward_funcs(reward_funcs, reward_weights)
        self.names = [reward_func_name(f) for f in self.funcs]
        check_aggregation(aggregation)
        self.aggregation = aggregation
        self.async_rewards, self.num_workers = async_rewards, num_workers or len(self.funcs) + 1
        self._functions_pool = self._scoring_thread = None  # made at the first `start` (again after `close`)

    def start(self, inputs: list[dict[str, Any]], videos: torch.Tensor | None, num_generations: int,
              **kwargs) -> Callable[[], GroupRewards]:  # fmt: skip
        """Start scoring `videos` `[N * G, F, C, H, W]` ([`score_group`]); call the result to get the rewards."""
        if self.async_rewards and self._scoring_thread is None:
            self._functions_pool = DaemonThreadPool(self.num_workers, "reward")
            self._scoring_thread = DaemonThreadPool(1, "reward-scoring")
        score = partial(
            score_group, self.funcs, self.weights, inputs, videos, num_generations, self.aggregation,
            self._functions_pool, **kwargs,
        )  # fmt: skip
        if not self.async_rewards:
            rewards = score()
            return lambda: rewards
        return self._scoring_thread.submit(score).result

    def to(self, device: torch.device | str) -> RewardScorer:
        """
        Move the torch modules the reward functions hold (their attributes, and their attributes' attributes, e.g. a
        CLIP model) from the CPU to `device`, as the trainer does with its accelerator's device. Modules already
        placed elsewhere (e.g. a reward model put on a second GPU), quantised ones and ones dispatched with a
        `device_map` stay where they are.
        """
        for module in (m for func in self.funcs for m in reward_modules(func)):
            first = next(module.parameters(), None)
            on_cpu = first is not None and first.device.type == "cpu"
            if on_cpu and not quantized_parameters(module) and getattr(module, "hf_device_map", None) is None:
                module.to(device)
        return self

    def failure_metrics(self) -> dict[str, float]:
        """`rewards/<name>/failures`: the cumulative `failures` count of rewards that keep one (servers, judges)."""
        return {
            f"rewards/{name}/failures": float(func.failures)
            for name, func in zip(self.names, self.funcs)
            if isinstance(getattr(func, "failures", None), int)
        }

    def close(self, wait: bool = True) -> None:
        """
        Stop the threads of `async_rewards`: scores not started are cancelled; with `wait`, the running ones are
        waited for. The threads are daemons, so a process that fails while a reward runs exits without waiting for
        it. The next `start` makes new threads.
        """
        pools, self._functions_pool, self._scoring_thread = (self._functions_pool, self._scoring_thread), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------- toy rewards
def redness(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    """Toy reward in `[0, 1]`: how much red dominates each video (`videos` `[N, F, C, H, W]` in `[0, 1]`)."""
    r, g, b = videos[:, :, 0], videos[:, :, 1], videos[:, :, 2]
    return ((r - (g + b) / 2).mean(dim=(1, 2, 3)) * 0.5 + 0.5).tolist()


def random_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    """
    Control reward: uniform in `[0, 1]` from torch's global generator, whatever the video. A run on it alone has no
    signal, so what it does to the model is what the update costs by itself.
    """
    return torch.rand(len(prompts)).tolist()


def load_reward_func(spec=None, /, **options) -> RewardFunc:
    """
    The reward function a name denotes, the one place names resolve: the reward models and clients with their
    options (`"videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA"`, `"pickscore"`, `"judge:URL?model=..."`,
    `"server:URL"`, ...), the weight-free video metrics (`"motion_magnitude"`, `"flicker"`, `"sharpness"`), the toy
    rewards `"redness"` and `"random"` above, a reward of the Moving Shapes world (`"prominence_reward"`, ...), or an
    import path (`"package.module.function"`, `"MODULE:CALLABLE"`); also the YAML form, a mapping with a `name`.
    See [`~trl_arcopo.rewards.registry.load_reward_func`].
    """
    from .registry import load_reward_func as resolve

    return resolve(spec, **options)
