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
"""Forked group rollouts: a shared prefix generated once, then G branches that differ only in one chunk's noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .kv_cache import KVCache
from .sampling import RolloutNoise, SamplerType


if TYPE_CHECKING:
    from .pipelines import SelfForcingPipeline


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
        noise ([`RolloutNoise`]): the noise of every branch, batch `B * G` (shared except the pivot chunk's initial noise).
        num_forward_passes (`int`): single-chunk, single-video transformer forwards used (a call on a batch of `n`
            chunks counts `n`); `B * G * L * (T + 1)` for independent rollouts.
    """

    latents: torch.Tensor
    pivot: int
    states: torch.Tensor
    x0_preds: torch.Tensor
    prefix_cache: KVCache
    noise: RolloutNoise
    num_forward_passes: int


@torch.no_grad()
def forked_rollout(
    pipeline: SelfForcingPipeline,
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
) -> ForkedRollout:
    """
    Generate chunks `0..pivot-1` once per prompt, fork the KV cache into `G = branch_noise.shape[0] // B` branches,
    denoise the pivot chunk of each branch from its own initial noise (recording the trajectory), and complete every
    branch with the shared noise.

    Args:
        prompt_embeds (`torch.Tensor` of shape `[B, S, text_dim]`): one row per group.
        noise ([`RolloutNoise`]): batch `B`, the shared noise of each group.
        pivot (`int`): chunk index in `[0, L)`.
        branch_noise (`torch.Tensor` of shape `[B * G, C, Fc, H, W]`): the pivot chunk's initial noise per branch
            (e.g. from [`trl_arcopo.sampling.neighbor_noise`]).
        branch_renoise (`torch.Tensor` of shape `[B * G, T - 1, C, Fc, H, W]`, *optional*): the pivot chunk's re-noise
            per branch (SDE-GRPO explores there); by default the branches share it.

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
    steps = len(timesteps)

    # 1. Shared prefix, once per group
    cache = pipeline.prepare_cache(batch_size, noise.initial.shape[2], latent_height, latent_width)
    prefix = pipeline.generate_latents(
        prompt_embeds, noise, cache, timesteps, sigmas, sampler, start_chunk=0, end_chunk=pivot
    )  # [B, C, pivot * Fc, H, W]
    passes = batch_size * pivot * (steps + 1)

    # 2. Fork: branches share the prefix cache (copied, not recomputed) and all noise but the pivot's initial noise
    branch_cache = cache.fork(num_branches)
    branch_embeds = prompt_embeds.repeat_interleave(num_branches, dim=0)  # [B * G, S, text_dim]
    branch_noise_all = noise.repeat_interleave(num_branches).with_chunk_initial(pivot, branch_noise)
    if branch_renoise is not None:
        branch_noise_all = branch_noise_all.with_chunk_renoise(pivot, branch_renoise)

    # 3. Pivot chunk with its trajectory
    pivot_out = pipeline.denoise_chunk(
        branch_noise_all.chunk_initial(pivot),
        branch_embeds,
        branch_cache,
        pivot * frames,
        timesteps,
        sigmas,
        branch_noise_all.chunk_renoise(pivot),
        sampler,
        record_trajectory=True,
    )
    pipeline.commit_chunk(pivot_out.x0, branch_embeds, branch_cache, pivot * frames)

    # 4. Completion of every branch
    suffix = pipeline.generate_latents(
        branch_embeds, branch_noise_all, branch_cache, timesteps, sigmas, sampler, start_chunk=pivot + 1
    )  # [B * G, C, (L - pivot - 1) * Fc, H, W]
    passes += batch_size * num_branches * (num_chunks - pivot) * (steps + 1)

    latents = torch.cat([prefix.repeat_interleave(num_branches, dim=0), pivot_out.x0, suffix], dim=2)
    # latents: [B * G, C, F, H, W]
    return ForkedRollout(
        latents=latents,
        pivot=pivot,
        states=pivot_out.states,
        x0_preds=pivot_out.x0_preds,
        prefix_cache=cache,
        noise=branch_noise_all,
        num_forward_passes=passes,
    )
