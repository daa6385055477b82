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
Forked group rollouts: a shared prefix generated once, then G branches that differ only in one chunk's noise
([`forked_rollout`]), the run's video and schedule ([`RolloutSpec`]), and one group per prompt drawn for training
([`sample_group`], a [`~trl_arcopo.rollout_group.RolloutGroup`]).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kv_cache import AnyKVCache
from .loss import LossStrategy, get_loss_strategy
from .rollout_group import RolloutGroup
from .sampling import RolloutNoise, SamplerType, chunk_schedule, neighbor_noise


if TYPE_CHECKING:
    from .generator import StreamingGenerator


@dataclass
class ForkedRollout:
    r"""
    A group of videos forked at one chunk.

    Args:
        latents (`torch.Tensor` of shape `[B * G, C, F, H, W]`):
            The full latent video of every branch (branches of prompt `b` are rows `b * G .. b * G + G - 1`).
        pivot (`int`): the chunk where the branches fork.
        states (`torch.Tensor` of shape `[B * G, T, C, Fc, H, W]`): the pivot chunk's state `x_t` at every step.
        x0_preds (`torch.Tensor` of shape `[B * G, T, C, Fc, H, W]`): the pivot chunk's `x̂0` at every step.
        prefix_cache ([`KVCache`]): the cache after committing chunks `< pivot`, batch `B` (shared by the branches).
        num_forward_passes (`int`): single-chunk, single-video transformer forwards used (a call on a batch of `n`
            chunks counts `n`); `B * G * (L * (T + 1) - 1)` for independent rollouts (the last chunk is not
            committed).
        branch_cache_bytes (`int`): the largest KV-cache storage the branches held at once, beyond the prefix.
    """

    latents: torch.Tensor
    pivot: int
    states: torch.Tensor
    x0_preds: torch.Tensor
    prefix_cache: AnyKVCache
    num_forward_passes: int
    branch_cache_bytes: int = 0


def branch_sub_batches(batch_size: int, num_branches: int, rollout_batch_size: int | None) -> list[tuple[int, slice]]:
    """
    The sub-batches a group's branches are rolled out in: `(prompt, rows)` with `rows` a slice of the `B * G` branch
    rows, at most `rollout_batch_size` branches of one prompt each; `None` is one batch of every branch (prompt `-1`).
    """
    if rollout_batch_size is None:
        return [(-1, slice(0, batch_size * num_branches))]
    if rollout_batch_size < 1:
        raise ValueError(f"`rollout_batch_size={rollout_batch_size}` must be at least 1 (or None: every branch).")
    return [
        (b, slice(b * num_branches + s, b * num_branches + min(s + rollout_batch_size, num_branches)))
        for b in range(batch_size)
        for s in range(0, num_branches, rollout_batch_size)
    ]


@torch.no_grad()
def forked_rollout(
    pipeline: StreamingGenerator,
    prompt_embeds: torch.Tensor,
    noise: RolloutNoise,
    pivot: int,
    branch_noise: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    latent_height: int,
    latent_width: int,
    sampler: SamplerType = "consistency",
    branch_renoise: torch.Tensor | None = None,
    rollout_batch_size: int | None = None,
    group_size: int | None = None,
    first_branch: int = 0,
    first_chunk_schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ForkedRollout:
    """
    Generate chunks `0..pivot-1` once per prompt, fork the KV cache into `G = branch_noise.shape[0] // B` branches,
    denoise the pivot chunk of each branch from its own initial noise (recording the trajectory), and complete every
    branch with the shared noise.

    The branches read the prefix's keys and values where the prefix wrote them (one copy per prompt) and own cache
    storage only for the chunks they commit after it; the last chunk is never committed.

    Args:
        prompt_embeds (`torch.Tensor` of shape `[B, S, text_dim]`): one row per group.
        noise ([`RolloutNoise`]): batch `B`, the shared noise of each group.
        pivot (`int`): chunk index in `[0, L)`.
        branch_noise (`torch.Tensor` of shape `[B * G, C, Fc, H, W]`): the pivot chunk's initial noise per branch
            (e.g. from [`trl_arcopo.sampling.neighbor_noise`]).
        branch_renoise (`torch.Tensor` of shape `[B * G, T - 1, C, Fc, H, W]`, *optional*): the pivot chunk's re-noise
            per branch (SDE-GRPO explores there); by default the branches share it.
        rollout_batch_size (`int`, *optional*): roll the branches out in sequential sub-batches of at most this many
            branches of one prompt, from the one prefix (the branches' cache and activations shrink with it; the
            videos are the same). `None`: every branch in one batch.
        group_size (`int`, *optional*), first_branch (`int`): the branches given are `first_branch ..` of groups of
            `group_size` (a process's share of groups split over processes); they are computed as those rows of the
            whole batch, with the same bits. `None`: the branches given are the whole groups.
        first_chunk_schedule (`tuple[torch.Tensor, torch.Tensor]`, *optional*): chunk 0's own `(timesteps, sigmas)`
            ([`~trl_arcopo.StreamingGeneratorMixin.get_first_chunk_schedule`]); the pivot chunk 0 then records its steps.

    The result equals `B * G` independent rollouts with `noise.repeat_interleave(G).with_chunk_initial(pivot,
    branch_noise)`, at a fraction of the cost.
    """
    batch_size = prompt_embeds.shape[0]
    num_chunks, frames = noise.num_chunks, noise.num_frames_per_chunk
    if not 0 <= pivot < num_chunks:
        raise ValueError(f"`pivot={pivot}` must be a chunk index in [0, {num_chunks}).")
    if noise.batch_size != batch_size:
        raise ValueError(f"`noise` has batch {noise.batch_size} but there are {batch_size} prompts.")
    if branch_noise.shape[0] % batch_size:
        raise ValueError(f"`branch_noise` has {branch_noise.shape[0]} rows, not a multiple of {batch_size} prompts.")
    num_branches = branch_noise.shape[0] // batch_size
    group_size = num_branches if group_size is None else group_size
    if not 0 <= first_branch <= group_size - num_branches:
        raise ValueError(
            f"Branches {first_branch}..{first_branch + num_branches - 1} are not in a group of `group_size={group_size}`."
        )
    if group_size != num_branches and rollout_batch_size is None:
        rollout_batch_size = num_branches  # a share of each group: one sub-batch per prompt

    def steps_of(chunk: int) -> int:
        return len(chunk_schedule(chunk, (timesteps, sigmas), first_chunk_schedule)[0])

    pivot_timesteps, pivot_sigmas = chunk_schedule(pivot, (timesteps, sigmas), first_chunk_schedule)

    # 1. Shared prefix, once per group: a cache of the prefix's chunks only
    cache = pipeline.prepare_cache(batch_size, pivot * frames, latent_height, latent_width)
    prefix = pipeline.generate_latents(
        prompt_embeds, noise, cache, timesteps, sigmas, sampler, start_chunk=0, end_chunk=pivot,
        first_chunk_schedule=first_chunk_schedule,
    )  # fmt: skip
    passes = batch_size * sum(steps_of(c) + 1 for c in range(pivot))

    # 2. Branches, in sub-batches: each reads the prefix and owns the chunks from the pivot on (the last excluded)
    outputs, branch_cache_bytes = [], 0
    for b, rows in branch_sub_batches(batch_size, num_branches, rollout_batch_size):
        first, count = (0, batch_size) if b < 0 else (b, 1)  # the prompts of this sub-batch
        per_prompt = (rows.stop - rows.start) // count
        branch_cache = cache.narrow(first, count).fork(per_prompt, num_frames=(num_chunks - 1) * frames)
        branch_cache_bytes = max(branch_cache_bytes, branch_cache.nbytes)
        embeds = prompt_embeds[first : first + count].repeat_interleave(per_prompt, dim=0)  # [n, S, text_dim]
        branch_noise_sub = noise.narrow(first, count).repeat_interleave(per_prompt)
        branch_noise_sub = branch_noise_sub.with_chunk_initial(pivot, branch_noise[rows])
        if branch_renoise is not None:
            branch_noise_sub = branch_noise_sub.with_chunk_renoise(pivot, branch_renoise[rows])

        # the sub-batch's rows of the whole batch: computed with the same bits as in one batch
        offset = b * group_size + first_branch + rows.start - b * num_branches  # the row in the whole batch
        sub_batch = getattr(pipeline.transformer, "sub_batch", None)  # without it: rows computed at their batch size
        rows_of = nullcontext() if b < 0 or sub_batch is None else sub_batch(offset, batch_size * group_size)
        with rows_of:
            # 3. Pivot chunk with its trajectory
            pivot_out = pipeline.denoise_chunk(
                branch_noise_sub.chunk_initial(pivot), embeds, branch_cache, pivot * frames, pivot_timesteps,
                pivot_sigmas, branch_noise_sub.chunk_renoise(pivot, len(pivot_timesteps)), sampler,
                record_trajectory=True,
            )  # fmt: skip
            if pivot < num_chunks - 1:
                pipeline.commit_chunk(pivot_out.x0, embeds, branch_cache, pivot * frames)

            # 4. Completion of every branch
            suffix = pipeline.generate_latents(
                embeds, branch_noise_sub, branch_cache, timesteps, sigmas, sampler, start_chunk=pivot + 1
            )  # [n, C, (L - pivot - 1) * Fc, H, W]
        outputs.append((pivot_out, suffix))
        del branch_cache
    passes += batch_size * num_branches * (sum(steps_of(c) + 1 for c in range(pivot, num_chunks)) - 1)

    latents = torch.cat(
        [
            prefix.repeat_interleave(num_branches, dim=0),
            torch.cat([out.x0 for out, _ in outputs]),
            torch.cat([suffix for _, suffix in outputs]),
        ],
        dim=2,
    )  # [B * G, C, F, H, W]
    return ForkedRollout(
        latents=latents,
        pivot=pivot,
        states=torch.cat([out.states for out, _ in outputs]),
        x0_preds=torch.cat([out.x0_preds for out, _ in outputs]),
        prefix_cache=cache,
        num_forward_passes=passes,
        branch_cache_bytes=branch_cache_bytes,
    )


def reward_chunk_range(
    pivot: int, num_chunks: int, window_chunks: int | None = None, context_chunks: int = 0
) -> tuple[int, int]:
    """
    The chunks `[start, stop)` a group forked at `pivot` is scored on: `window_chunks` chunks from the pivot on and
    `context_chunks` before it, clipped to the video; every chunk when `window_chunks` is `None`.
    """
    if window_chunks is None:
        return 0, num_chunks
    return max(0, pivot - context_chunks), min(num_chunks, pivot + window_chunks)


@dataclass
class RolloutSpec:
    r"""
    What every rollout of a run shares, resolved from a pipeline and a config and checked before any rollout.

    Args:
        video_size (`tuple[int, int, int]`): height, width, frames.
        latent_shape (`tuple`): `[1, C, F, H, W]` of one video.
        num_frames_per_chunk (`int`), num_chunks (`int`).
        timesteps (`torch.Tensor` of shape `[T]`), sigmas (`torch.Tensor` of shape `[T + 1]`): the denoising schedule.
        sampler (`str`): `"consistency"` or `"ode"`.
        first_chunk_schedule (`tuple[torch.Tensor, torch.Tensor]`, *optional*): chunk 0's own `(timesteps, sigmas)`
            when it differs (Causal-Forcing++).
    """

    video_size: tuple[int, int, int]
    latent_shape: tuple[int, int, int, int, int]
    num_frames_per_chunk: int
    num_chunks: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sampler: str
    first_chunk_schedule: tuple[torch.Tensor, torch.Tensor] | None = None

    def schedule(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(timesteps, sigmas)` of chunk `chunk`: the first chunk's own when there is one."""
        return chunk_schedule(chunk, (self.timesteps, self.sigmas), self.first_chunk_schedule)

    @property
    def num_noise_steps(self) -> int:
        """Steps of the longest chunk schedule: the re-noise a rollout draws per chunk (less one)."""
        first = len(self.first_chunk_schedule[0]) if self.first_chunk_schedule else 0
        return max(len(self.timesteps), first)

    @classmethod
    def from_pipeline(
        cls,
        pipeline: StreamingGenerator,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_frames_per_chunk: int | None = None,
        denoising_sigmas: list[float] | None = None,
        sampler: str | None = None,
    ) -> RolloutSpec:
        """The spec of videos of `pipeline`; every `None` takes the pipeline's default."""
        config = pipeline.config
        video_size = (
            height or config.default_height,
            width or config.default_width,
            num_frames or config.default_num_frames,
        )
        frames = num_frames_per_chunk or getattr(config, "default_num_frames_per_chunk", 3)
        latent_shape = pipeline.latent_shape(1, *video_size, frames)
        timesteps, sigmas = pipeline.get_schedule(denoising_sigmas)
        first_chunk = getattr(pipeline, "get_first_chunk_schedule", lambda: None)()
        sampler = sampler or getattr(config, "default_sampler", "consistency")
        return cls(
            video_size, latent_shape, frames, latent_shape[2] // frames, timesteps, sigmas, sampler, first_chunk
        )

    @classmethod
    def from_config(cls, pipeline: StreamingGenerator, args) -> RolloutSpec:
        """
        The spec of an [`ARCoPOConfig`] on `pipeline`. Raises a `ValueError` naming the value for a pivot or trained
        step outside the video or schedule, or a schedule or sampler the loss cannot train with
        ([`~trl_arcopo.loss.LossStrategy.check`]).
        """
        spec = cls.from_pipeline(
            pipeline, args.height, args.width, args.num_frames, args.num_frames_per_chunk, args.denoising_sigmas,
            args.sampler,
        )  # fmt: skip
        if args.pivot_chunk is not None and args.pivot_chunk >= spec.num_chunks:
            raise ValueError(
                f"`pivot_chunk={args.pivot_chunk}` but the video has {spec.num_chunks} chunks; use an index in "
                f"[0, {spec.num_chunks}) or None (uniform)."
            )
        steps = min(len(spec.timesteps), len(spec.schedule(0)[0]))  # every pivot's schedule has them
        strategy = get_loss_strategy(args.loss_type)
        strategy.check(spec.sampler, steps)  # the sampler may be the pipeline's `default_sampler`
        if strategy.exploration not in EXPLORATIONS:
            raise ValueError(
                f"`loss_type={args.loss_type!r}` explores with {strategy.exploration!r}, which `sample_group` does not "
                f"know: register the loss with an exploration of {EXPLORATIONS}."
            )
        trainable = strategy.trainable_steps(steps)
        if args.train_denoising_steps is not None and max(args.train_denoising_steps) >= trainable:
            raise ValueError(
                f"`train_denoising_steps={list(args.train_denoising_steps)}` but the schedule has {steps} steps"
                + ("" if strategy.trains_last_step else f" and `{args.loss_type}` cannot train the last one")
                + f": use indices in [0, {trainable})."
            )
        return spec

    def trained_steps(
        self,
        train_denoising_steps: list[int] | None = None,
        pivot: int | None = None,
        loss: LossStrategy | None = None,
    ) -> list[int]:
        """
        The denoising steps an update of a group forked at `pivot` trains: the given ones, else all of the pivot's
        schedule that `loss` can train ([`~trl_arcopo.loss.LossStrategy.trainable_steps`]; `None`: all).
        """
        if train_denoising_steps is not None:
            return sorted(train_denoising_steps)
        steps = len(self.schedule(pivot)[0])
        return list(range(steps if loss is None else loss.trainable_steps(steps)))


EXPLORATIONS = ("neighbors", "sde")


@torch.no_grad()
def sample_group(
    pipeline: StreamingGenerator,
    spec: RolloutSpec,
    prompts: list[str],
    prompt_embeds: torch.Tensor,
    num_generations: int,
    generator: torch.Generator | None = None,
    pivot: int | None = None,
    exploration: str = "neighbors",
    fork_noise_scale: float = 0.5,
    rollout_batch_size: int | None = None,
    branches: slice | None = None,
) -> RolloutGroup:
    """
    Roll out one group of `num_generations` candidates per prompt, forked at one chunk, and record the pivot chunk's
    trajectory. Draws, in this order from `generator`: the rollout noise, the pivot (uniform over the chunks when
    `pivot` is `None`), then the exploration at the pivot:
    - `"neighbors"` (AR-CoPO): each candidate's initial noise is a neighbour of the group's
      ([`~trl_arcopo.sampling.neighbor_noise`] with `fork_noise_scale`);
    - `"sde"` (SDE-GRPO): the same initial noise, each candidate its own re-noise of the consistency sampler.

    Args:
        spec ([`RolloutSpec`]): the video size, chunking, schedule and sampler.
        prompts (`list[str]`), prompt_embeds (`torch.Tensor` of shape `[N, S, text_dim]`): the `N` groups.
        rollout_batch_size (`int`, *optional*): branches per forward ([`forked_rollout`]); the same group either way.
        branches (`slice`, *optional*): roll out only these candidates of each group (everything is drawn as for the
            whole group; a process's share when groups are split over processes): the group returned holds them,
            with the bits they have in the whole group. `None`: every candidate.

    Returns:
        [`RolloutGroup`] with the finished `latents` `[N, G, C, F, H, W]`, without rewards ([`RolloutGroup.with_rewards`])
        or the loss's temperature ([`~trl_arcopo.loss.LossStrategy`]), which the trainer sets.

    Example:

    ```py
    >>> spec = RolloutSpec.from_pipeline(pipe)
    >>> embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    >>> group = sample_group(pipe, spec, ["a red fox jumps"], embeds, 8, torch.Generator().manual_seed(0), pivot=2)
    >>> videos = pipe.decode_latents(group.latents.flatten(0, 1), output_type="pt")  # [8, F, C, H, W]
    ```
    """
    if exploration not in EXPLORATIONS:
        raise ValueError(f"`exploration={exploration!r}` is not one of {EXPLORATIONS}.")
    n, g = len(prompts), num_generations
    device = prompt_embeds.device
    shape = (n, *spec.latent_shape[1:])
    noise = RolloutNoise.sample(
        shape, spec.num_frames_per_chunk, spec.num_noise_steps, spec.sampler, generator, device=device
    )
    if pivot is None:
        pivot = int(torch.randint(noise.num_chunks, (1,), generator=generator, device=device).item())
    base = noise.chunk_initial(pivot)  # [N, C, Fc, H, W]
    branch_renoise = None
    if exploration == "neighbors":
        branch_noise = neighbor_noise(base, g, fork_noise_scale, generator)  # [N * G, C, Fc, H, W]
    else:
        branch_noise = base.repeat_interleave(g, dim=0)
        steps = len(spec.schedule(pivot)[0])
        branch_renoise = torch.randn(
            (n * g, *noise.chunk_renoise(pivot, steps).shape[1:]), generator=generator, device=device
        )  # [N * G, T - 1, C, Fc, H, W]
    first, local = 0, g
    if branches is not None:  # this share of every group's candidates
        first, stop, _ = branches.indices(g)
        local = stop - first
        branch_noise = branch_noise.unflatten(0, (n, g))[:, first:stop].flatten(0, 1)
        if branch_renoise is not None:
            branch_renoise = branch_renoise.unflatten(0, (n, g))[:, first:stop].flatten(0, 1)
    fork = forked_rollout(
        pipeline, prompt_embeds, noise, pivot, branch_noise, spec.timesteps, spec.sigmas, shape[3], shape[4],
        spec.sampler, branch_renoise, rollout_batch_size, group_size=g, first_branch=first,
        first_chunk_schedule=spec.first_chunk_schedule,
    )  # fmt: skip
    g = local
    return RolloutGroup(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        pivot=pivot,
        frame_offset=pivot * spec.num_frames_per_chunk,
        prefix_cache=fork.prefix_cache,
        states=fork.states.unflatten(0, (n, g)),
        x0_preds=fork.x0_preds.unflatten(0, (n, g)).clone(),  # [N, G, T, C, Fc, H, W]
        timesteps=spec.schedule(pivot)[0],
        sigmas=spec.schedule(pivot)[1],
        latents=fork.latents.unflatten(0, (n, g)),
        num_forward_passes=fork.num_forward_passes,
    )
