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
"""A bounded buffer of forked rollout groups (for semi-on-policy AR-CoPO), stored without KV caches."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .io_utils import atomic_path, load_tensors_only, process_file
from .kv_cache import KVCache
from .rollout import RolloutSpec
from .rollout_group import RolloutGroup


if TYPE_CHECKING:
    from .generator import StreamingGenerator

logger = logging.get_logger(__name__)


@dataclass
class BufferEntry:
    r"""
    One group, stored compactly: what rebuilds the prefix cache plus the pivot chunk's trajectory and the rewards.

    Args:
        prompt (`str`).
        prompt_embeds (`torch.Tensor` of shape `[S, text_dim]`).
        pivot (`int`): the chunk where the group forked.
        prefix_latents (`torch.Tensor` of shape `[C, pivot * Fc, H, W]`): the clean chunks before the pivot.
        states (`torch.Tensor` of shape `[G, T, C, Fc, H, W]`): the pivot chunk's state at every step, per candidate.
        x0_preds (`torch.Tensor` of shape `[G, T, C, Fc, H, W]`): the behaviour policy's `x̂0` at those states.
        rewards (`torch.Tensor` of shape `[G]`): the combined sequence-level rewards.
    """

    prompt: str
    prompt_embeds: torch.Tensor
    pivot: int
    prefix_latents: torch.Tensor
    states: torch.Tensor
    x0_preds: torch.Tensor
    rewards: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = (self.prompt_embeds, self.prefix_latents, self.states, self.x0_preds, self.rewards)
        return sum(t.numel() * t.element_size() for t in tensors)


class ReplayBuffer:
    r"""
    A bounded first-in-first-out buffer of [`BufferEntry`] groups.

    When full, adding an entry drops the oldest one. Sampling draws distinct entries uniformly with an explicit
    generator. `state_dict()` / `load_state_dict()` round-trip exactly; `save()` writes atomically (a crash never
    leaves a truncated file).

    Args:
        capacity (`int`): the most groups kept (paper: 100).

    Example:

    ```py
    >>> buffer = ReplayBuffer(capacity=100)
    >>> buffer.add(entry)
    >>> batch = buffer.sample(4, generator=torch.Generator().manual_seed(0))
    ```
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"`capacity={capacity}` must be at least 1 (paper: 100 groups).")
        self.capacity = capacity
        self.entries: list[BufferEntry] = []
        self.num_added = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def add(self, entry: BufferEntry) -> None:
        if entry.states.shape != entry.x0_preds.shape or entry.rewards.shape != entry.states.shape[:1]:
            raise ValueError(
                f"Inconsistent entry: states {tuple(entry.states.shape)}, x0_preds {tuple(entry.x0_preds.shape)}, "
                f"rewards {tuple(entry.rewards.shape)} (expected [G, T, ...], [G, T, ...] and [G])."
            )
        # compact CPU copies: a view would drag (and save) the whole rollout tensor it points into
        detached = BufferEntry(
            **{k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in asdict(entry).items()}
        )
        if len(self.entries) == self.capacity:
            self.entries.pop(0)
        self.entries.append(detached)
        self.num_added += 1

    def informative_indices(self) -> list[int]:
        """Indices of the entries whose rewards are not all equal (the groups with a non-zero advantage)."""
        return [i for i, e in enumerate(self.entries) if (e.rewards.max() - e.rewards.min()).item() > 0]

    def sample(
        self, n: int, generator: torch.Generator | None = None, informative_only: bool = False
    ) -> list[BufferEntry]:
        """
        `n` distinct entries drawn uniformly (without replacement); with `informative_only`, among the entries whose
        rewards differ (see [`~ReplayBuffer.informative_indices`]).
        """
        pool = self.informative_indices() if informative_only else list(range(len(self.entries)))
        if not 1 <= n <= len(pool):
            which = "informative entries (rewards not all equal)" if informative_only else "entries"
            raise ValueError(f"Cannot sample {n} entries from a buffer with {len(pool)} {which}.")
        index = torch.randperm(len(pool), generator=generator)[:n]
        return [self.entries[pool[i]] for i in index.tolist()]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "num_added": self.num_added, "entries": [asdict(e) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.num_added = state["num_added"]
        self.entries = [BufferEntry(**e) for e in state["entries"]]

    def save(self, path: str) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    @classmethod
    def load(cls, path: str) -> ReplayBuffer:
        """
        Read a buffer written by [`~ReplayBuffer.save`]. The file is unpickled with `weights_only=True`: tensors,
        numbers, strings and plain containers only, so a crafted file cannot run code; anything else is refused.
        """
        state = load_tensors_only(
            path, "a replay buffer written by `ReplayBuffer.save`",
            "Delete it, or point `replay_buffer_path` elsewhere, to collect a new buffer.",
        )  # fmt: skip
        buffer = cls(state["capacity"])
        buffer.load_state_dict(state)
        return buffer


@torch.no_grad()
def rebuild_prefix_cache(
    pipeline: StreamingGenerator,
    entry: BufferEntry | list[BufferEntry],
    num_frames_per_chunk: int,
    num_latent_frames: int,
) -> KVCache:
    """
    The KV cache of the prefix of one entry (batch 1) or of several entries with the same pivot (batch `len(entry)`),
    rebuilt with one commit pass per stored clean chunk by `pipeline.transformer` as it is configured (disable its
    adapters for the reference policy). Equal to the cache at collection time when that had the same batching and the
    transformer has not changed.
    """
    entries = entry if isinstance(entry, list | tuple) else [entry]
    if not entries:
        raise ValueError("`entry` is an empty list: give at least one BufferEntry.")
    pivots = {e.pivot for e in entries}
    if len(pivots) != 1:
        raise ValueError(f"Entries with different pivots {sorted(pivots)} cannot share a cache; group them by pivot.")
    device = pipeline._execution_device
    _, _, height, width = entries[0].prefix_latents.shape
    cache = pipeline.prepare_cache(len(entries), entries[0].pivot * num_frames_per_chunk, height, width)
    embeds = torch.stack([e.prompt_embeds for e in entries]).to(device)  # [B, S, text_dim]
    latents = torch.stack([e.prefix_latents for e in entries]).to(device)  # [B, C, pivot * Fc, H, W]
    for c in range(entries[0].pivot):
        chunk = latents[:, :, c * num_frames_per_chunk : (c + 1) * num_frames_per_chunk]  # [B, C, Fc, H, W]
        pipeline.commit_chunk(chunk, embeds, cache, c * num_frames_per_chunk)
    return cache


# ---------------------------------------------------------------------------------------------------- groups <-> entries
def entries_from_group(group: RolloutGroup) -> list[BufferEntry]:
    """One compact [`BufferEntry`] per prompt group (no KV cache: the prefix latents rebuild it)."""
    prefix = group.prefix_latents  # [N, C, pivot * Fc, H, W]
    return [
        BufferEntry(
            prompt=prompt,
            prompt_embeds=group.prompt_embeds[i],
            pivot=group.pivot,
            prefix_latents=prefix[i],
            states=group.states[i],
            x0_preds=group.x0_preds[i],
            rewards=group.rewards[i],
        )
        for i, prompt in enumerate(group.prompts)
    ]


def group_from_entries(
    pipeline: StreamingGenerator,
    spec: RolloutSpec,
    entries: list[BufferEntry],
) -> RolloutGroup:
    """
    The [`RolloutGroup`] of buffer entries with one pivot (the inverse of [`entries_from_group`]); the prefix cache
    is rebuilt by `pipeline.transformer` as it is configured (disable its adapters for the reference policy). The
    rewards are the stored ones; set the advantages with [`RolloutGroup.with_rewards`].
    """
    device = pipeline._execution_device
    cache = rebuild_prefix_cache(pipeline, list(entries), spec.num_frames_per_chunk, spec.latent_shape[2])
    return RolloutGroup(
        prompts=[e.prompt for e in entries],
        prompt_embeds=torch.stack([e.prompt_embeds for e in entries]).to(device),
        pivot=entries[0].pivot,
        frame_offset=entries[0].pivot * spec.num_frames_per_chunk,
        prefix_cache=cache,
        states=torch.stack([e.states for e in entries]).to(device),  # [N, G, T, C, Fc, H, W]
        x0_preds=torch.stack([e.x0_preds for e in entries]).to(device),  # [N, G, T, C, Fc, H, W]
        timesteps=spec.schedule(entries[0].pivot)[0],
        sigmas=spec.schedule(entries[0].pivot)[1],
        rewards=torch.stack([e.rewards for e in entries]).to(device),  # [N, G]
    )


# ---------------------------------------------------------------------------------------------------- lifecycle
def replay_buffer_file(folder: str, path: str | None = None, rank: int = 0, num_processes: int = 1) -> str:
    """This process's buffer file: `path` if given, else `folder/replay_buffer.pt` (`-rank{i}` with several)."""
    if path is None:
        path = os.path.join(folder, "replay_buffer.pt")
    elif not os.path.splitext(path)[1]:
        path += ".pt"
    return process_file(path, rank, num_processes)


def check_buffer_compatible(buffer: ReplayBuffer, spec: RolloutSpec, num_generations: int, source: str) -> None:
    """
    Refuse a buffer collected for another run: its groups must have this run's (num_generations, denoising steps,
    channels, frames per chunk), and every pivot must be a chunk of this run's videos.
    """
    num_chunks = spec.num_chunks
    for entry in buffer.entries:
        steps = len(spec.schedule(entry.pivot)[0])  # the pivot's schedule (the first chunk may have its own)
        expected = (num_generations, steps, spec.latent_shape[1], spec.num_frames_per_chunk)
        got = tuple(entry.states.shape[:4])
        if got != tuple(expected) or entry.pivot >= num_chunks:
            raise ValueError(
                f"The replay buffer {source} was collected with (num_generations, denoising steps, channels, frames "
                f"per chunk) = {got} and pivot {entry.pivot}, but this run has {tuple(expected)} and {num_chunks} "
                "chunks: delete the file or point `replay_buffer_path` elsewhere to collect a new buffer."
            )


def collect_replay_buffer(
    buffer: ReplayBuffer,
    dataset: Any,
    rollout: Callable[[list[dict[str, Any]], int], RolloutGroup],
    batch_size: int,
    seed: int,
    rank: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ReplayBuffer:
    """
    Fill `buffer` to its capacity with groups of `rollout(rows, batch_index)` (the reference policy's rollouts),
    taking `batch_size` rows at a time of `dataset` in an order seeded by `(seed, rank)`. `progress(n)` is called
    with the groups added. Re-collecting with the same arguments gives the same buffer.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 7919 + rank))
    batch_index = 0
    while len(buffer) < buffer.capacity:
        take = min(batch_size, buffer.capacity - len(buffer))
        rows = [dataset[int(order[(batch_index * batch_size + i) % len(order)])] for i in range(take)]
        for entry in entries_from_group(rollout(rows, batch_index)):
            buffer.add(entry)
        if progress is not None:
            progress(take)
        batch_index += 1
    return buffer


def load_or_collect(
    buffer: ReplayBuffer,
    path: str,
    check: Callable[[ReplayBuffer, str], None],
    rollout: Callable[[list[dict[str, Any]], int], RolloutGroup],
    dataset: Any,
    batch_size: int,
    seed: int,
    rank: int = 0,
    informative_only: bool = True,
    show_progress: bool = True,
) -> tuple[ReplayBuffer, dict[str, float]]:
    """
    The replay buffer of a run: read from `path` if it exists (and passes `check(buffer, where)`), else filled by
    [`collect_replay_buffer`] and saved there. Returns it with its statistics (`buffer/...`). Raises a `ValueError` if
    `informative_only` and every group has equal rewards (nothing to learn from).
    """
    start = time.perf_counter()
    if os.path.exists(path):
        buffer = ReplayBuffer.load(path)
        check(buffer, f"in {path}")
        logger.info(f"Loaded a replay buffer of {len(buffer)} groups from {path}.")
    else:
        bar = tqdm(
            total=buffer.capacity, desc="Collecting reference rollouts", unit="group", disable=not show_progress
        )
        collect_replay_buffer(buffer, dataset, rollout, batch_size, seed, rank, bar.update)
        bar.close()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        buffer.save(path)
        logger.info(f"Collected a replay buffer of {len(buffer)} reference groups; saved to {path}.")
    informative = len(buffer.informative_indices())
    if informative == 0 and informative_only:
        raise ValueError(
            f"Every one of the {len(buffer)} replay-buffer groups in {path} has equal rewards (zero advantage), so "
            "semi-on-policy training has nothing to learn from. Collect a larger or more varied buffer: raise "
            "`replay_buffer_size` or `num_generations`, or widen the neighbour noise (`fork_noise_scale`), after "
            "deleting the file."
        )
    return buffer, {
        "buffer/groups": float(len(buffer)),
        "buffer/frac_reward_zero_std": 1 - informative / len(buffer),
        "buffer/memory_mb": buffer.nbytes / 2**20,
        "buffer/disk_mb": os.path.getsize(path) / 2**20,
        "buffer/seconds": time.perf_counter() - start,
    }


def link_or_save(buffer: ReplayBuffer, dest: str, source: str | None = None) -> None:
    """
    Write `buffer` to `dest` atomically (a checkpoint's copy). If `source` is a file holding exactly this buffer, it
    is hard-linked (no extra disk) or copied instead of serialised again.
    """
    if source is None or not os.path.exists(source):
        buffer.save(dest)
        return
    with atomic_path(dest) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


class ReplaySource:
    r"""
    One process's semi-on-policy data: its [`ReplayBuffer`], the file it lives in, and how it is filled (loaded or
    collected once), drawn from, copied into checkpoints and restored from them.

    Args:
        capacity (`int`): groups kept by this process.
        spec ([`~trl_arcopo.rollout.RolloutSpec`]) and num_generations (`int`): what a compatible group looks like.
        output_dir (`str`): where the buffer file goes when `path` is `None`.
        path (`str`, *optional*): the buffer file to load if it exists, else to collect into (`replay_buffer_path`).
        rank (`int`), num_processes (`int`): with several processes, each has its own `-rank{i}` file.
    """

    def __init__(self, capacity: int, spec: RolloutSpec, num_generations: int, output_dir: str,
                 path: str | None = None, rank: int = 0, num_processes: int = 1):  # fmt: skip
        self.buffer = ReplayBuffer(capacity)
        self.spec, self.num_generations, self.output_dir, self.path = spec, num_generations, output_dir, path
        self.rank, self.num_processes = rank, num_processes
        self.source: str | None = None  # the file holding exactly the in-memory buffer

    @classmethod
    def from_args(cls, args, spec: RolloutSpec, rank: int = 0, num_processes: int = 1) -> ReplaySource | None:
        """The source of a run's `ARCoPOConfig` (its share of `replay_buffer_size`), or `None` unless semi-on-policy."""
        if args.training_mode != "semi_on_policy":
            return None
        capacity = math.ceil(args.replay_buffer_size / num_processes)
        return cls(capacity, spec, args.num_generations, args.output_dir, args.replay_buffer_path, rank, num_processes)

    def file(self, folder: str | None = None) -> str:
        """This process's buffer file: the configured one, or the one in `folder` (a checkpoint)."""
        path = self.path if folder is None else None
        return replay_buffer_file(folder or self.output_dir, path, self.rank, self.num_processes)

    def load(self, path: str) -> ReplayBuffer:
        """Read a buffer file and refuse it if it was collected for another run."""
        buffer = ReplayBuffer.load(path)
        check_buffer_compatible(buffer, self.spec, self.num_generations, f"in {path}")
        return buffer

    def ensure(
        self,
        rollout: Callable[[list[dict[str, Any]], int], RolloutGroup],
        dataset: Any,
        batch_size: int,
        seed: int,
        informative_only: bool = True,
        show_progress: bool = True,
    ) -> dict[str, float] | None:
        """
        Fill the buffer once ([`load_or_collect`] with the reference policy's `rollout`; the caller disables the
        adapter). Returns its statistics when it was filled now, `None` when it was already full.
        """
        if len(self.buffer) >= self.buffer.capacity:
            return None
        path = self.file()
        self.buffer, stats = load_or_collect(
            self.buffer, path, lambda b, where: check_buffer_compatible(b, self.spec, self.num_generations, where),
            rollout, dataset, batch_size, seed, self.rank, informative_only, show_progress,
        )  # fmt: skip
        self.source = path
        return stats

    def draw(
        self,
        pipeline: StreamingGenerator,
        n: int,
        generator: torch.Generator,
        informative_only: bool = True,
    ) -> list[RolloutGroup]:
        """
        Up to `n` distinct groups (only the informative ones with `informative_only`), batched by pivot chunk, their
        prefixes rebuilt by `pipeline.transformer` as configured (disable its adapters: the reference's). Rewards
        are set; set the advantages with [`RolloutGroup.with_rewards`].
        """
        available = len(self.buffer.informative_indices()) if informative_only else len(self.buffer)
        entries = self.buffer.sample(min(n, available), generator, informative_only)
        return [
            group_from_entries(pipeline, self.spec, [e for e in entries if e.pivot == p])
            for p in sorted({e.pivot for e in entries})
        ]

    def save_to(self, folder: str) -> None:
        """A checkpoint's copy of the buffer (hard-linked from its file when that holds exactly this buffer)."""
        if len(self.buffer):
            link_or_save(self.buffer, self.file(folder), self.source if self.source == self.file() else None)

    def restore_from(self, folder: str) -> None:
        """The buffer of a checkpoint, if it has one (else it is loaded or collected again, identically)."""
        path = self.file(folder)
        if os.path.exists(path):
            self.buffer = self.load(path)
        else:
            logger.warning(f"{path} not found: the replay buffer will be loaded or collected again.")
