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
Forked group rollouts: a shared prefix generated once, then G branches that differ only in one chunk's noise; and
the group a training step learns from ([`RolloutGroup`], drawn by [`sample_group`]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io_utils import atomic_path
from .kv_cache import KVCache
from .loss import group_advantages, group_temperature
from .sampling import RolloutNoise, SamplerType, neighbor_noise


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


@dataclass
class RolloutGroup:
    r"""
    `N` prompt groups of `G` candidates forked at one chunk: everything the localised update needs.

    Args:
        prompts (`list[str]`): the `N` prompts.
        prompt_embeds (`torch.Tensor` of shape `[N, S, text_dim]`).
        pivot (`int`): the chunk where the groups forked.
        frame_offset (`int`): first latent frame of the pivot chunk.
        prefix_cache ([`KVCache`]): committed chunks `< pivot`, batch `N` (detached).
        states (`torch.Tensor` of shape `[N, G, T, C, Fc, H, W]`): pivot-chunk states `x_t` of every candidate.
        x0_preds (`torch.Tensor` of shape `[N, G, T, C, Fc, H, W]`): their old clean predictions `x̂0`.
        temperature (`torch.Tensor` of shape `[N, T]`): `τ` of each group and step.
        timesteps (`torch.Tensor` of shape `[T]`), sigmas (`torch.Tensor` of shape `[T + 1]`).
        latents (`torch.Tensor` of shape `[N, G, C, F, H, W]`, *optional*): the finished videos' latents.
        rewards (`torch.Tensor` of shape `[N, G]`, *optional*): combined sequence-level rewards (float64).
        advantages (`torch.Tensor` of shape `[N, G]`, *optional*).
        nonfinite (`str`, *optional*): why this group cannot train (a NaN or infinite latent, reward, advantage or
            temperature); every update on it is skipped. `None` when everything is finite.
        num_forward_passes (`int`): single-chunk, single-video transformer forwards the rollout used.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    pivot: int
    frame_offset: int
    prefix_cache: KVCache
    states: torch.Tensor
    x0_preds: torch.Tensor
    temperature: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    latents: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    nonfinite: str | None = None
    num_forward_passes: int = 0

    @property
    def num_generations(self) -> int:
        return self.states.shape[1]

    @property
    def prefix_latents(self) -> torch.Tensor:
        """The clean chunks before the pivot, `[N, C, pivot * Fc, H, W]` (shared by a group's candidates)."""
        if self.latents is None:
            raise ValueError("This group holds no `latents`; its prefix latents are unknown.")
        return self.latents[:, 0, :, : self.frame_offset]

    def with_rewards(
        self,
        rewards: torch.Tensor,
        scale_rewards: str = "group",
        quasi_norm_p: float | None = None,
        nonfinite: str | None = None,
    ) -> RolloutGroup:
        """
        Set `rewards` `[N, G]` and their group advantages (computed in the rewards' dtype, stored in float32), and
        record why the group cannot train: `nonfinite` (from the rollout or the rewards), else a non-finite
        advantage or temperature. Returns `self`.
        """
        if torch.isfinite(rewards).all():
            advantages = group_advantages(rewards, scale_rewards, quasi_norm_p)  # [N, G]
        else:  # the step is skipped; zero advantages keep the (discarded) update finite
            advantages = torch.zeros_like(rewards)
        if nonfinite is None and not torch.isfinite(advantages).all():
            nonfinite = "the advantages are not finite"
        temperature = self.temperature
        if nonfinite is None and not (torch.isfinite(temperature).all() and (temperature > 0).all()):
            nonfinite = f"the temperature is not a positive finite number (got {temperature.flatten()[0].item()})"
        self.rewards, self.advantages, self.nonfinite = rewards, advantages.float(), nonfinite
        return self

    def metrics(self) -> dict[str, float]:
        """TRL-style statistics of the scored groups: rewards, advantages, pivot and temperature."""
        r, adv = self.rewards, self.advantages
        return {
            "reward": r.mean().item(),
            "reward_std": r.std(dim=1).mean().item(),
            "frac_reward_zero_std": (r.std(dim=1) < 1e-8).float().mean().item(),
            "advantages/abs_mean": adv.abs().mean().item(),
            "advantages/max": adv.max().item(),
            "advantages/min": adv.min().item(),
            "pivot_chunk": float(self.pivot),
            "temperature": self.temperature.mean().item(),
        }

    def save(self, path: str) -> None:
        """
        Write the group (without its video latents), prefix KV cache included, to one safetensors file, atomically:
        what a checkpoint taken between two inner updates needs to resume exactly.
        """
        tensors = {
            "prompt_embeds": self.prompt_embeds,
            "states": self.states,
            "x0_preds": self.x0_preds,
            "temperature": self.temperature,
            "timesteps": self.timesteps,
            "sigmas": self.sigmas,
        }
        if self.rewards is not None:
            tensors["rewards"], tensors["advantages"] = self.rewards, self.advantages
        for i, (key, value) in enumerate(zip(self.prefix_cache.keys, self.prefix_cache.values)):
            tensors[f"prefix_cache.keys.{i}"], tensors[f"prefix_cache.values.{i}"] = key, value
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        cache = self.prefix_cache
        metadata = {
            "prompts": json.dumps(self.prompts),
            "pivot": str(self.pivot),
            "frame_offset": str(self.frame_offset),
            "nonfinite": json.dumps(self.nonfinite),
            "prefix_cache": json.dumps(
                {
                    "num_layers": cache.num_layers,
                    "tokens_per_frame": cache.tokens_per_frame,
                    "end": cache.end,
                    "local_attn_frames": cache.local_attn_frames,
                    "sink_frames": cache.sink_frames,
                }
            ),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> RolloutGroup:
        """Read a group written by [`~RolloutGroup.save`] (safetensors: no code runs while loading)."""
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        cache = json.loads(metadata["prefix_cache"])
        layers = range(cache.pop("num_layers"))
        prefix_cache = KVCache(
            keys=[tensors.pop(f"prefix_cache.keys.{i}") for i in layers],
            values=[tensors.pop(f"prefix_cache.values.{i}") for i in layers],
            **cache,
        )
        return cls(
            prompts=json.loads(metadata["prompts"]),
            pivot=int(metadata["pivot"]),
            frame_offset=int(metadata["frame_offset"]),
            prefix_cache=prefix_cache,
            nonfinite=json.loads(metadata["nonfinite"]),
            **tensors,
        )


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
    """

    video_size: tuple[int, int, int]
    latent_shape: tuple[int, int, int, int, int]
    num_frames_per_chunk: int
    num_chunks: int
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    sampler: str

    @classmethod
    def from_pipeline(
        cls,
        pipeline: SelfForcingPipeline,
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
        sampler = sampler or getattr(config, "default_sampler", "consistency")
        return cls(video_size, latent_shape, frames, latent_shape[2] // frames, timesteps, sigmas, sampler)

    @classmethod
    def from_config(cls, pipeline: SelfForcingPipeline, args) -> RolloutSpec:
        """
        The spec of an [`ARCoPOConfig`] on `pipeline`. Raises a `ValueError` naming the value for a pivot or trained
        step outside the video or schedule, or `sde_grpo` without the consistency sampler.
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
        steps = len(spec.timesteps)
        trainable = steps - (1 if args.loss_type == "sde_grpo" else 0)
        if args.train_denoising_steps is not None and max(args.train_denoising_steps) >= trainable:
            raise ValueError(
                f"`train_denoising_steps={list(args.train_denoising_steps)}` but the schedule has {steps} steps"
                + (" and `sde_grpo` cannot train the last one" if args.loss_type == "sde_grpo" else "")
                + f": use indices in [0, {trainable})."
            )
        if args.loss_type == "sde_grpo" and spec.sampler != "consistency":
            raise ValueError(
                f"`loss_type='sde_grpo'` explores through the consistency sampler's re-noise, but the sampler is "
                f"{spec.sampler!r} (the pipeline's `default_sampler`): set `sampler='consistency'`."
            )
        return spec

    def trained_steps(self, loss_type: str = "arcopo", train_denoising_steps: list[int] | None = None) -> list[int]:
        """The denoising steps an update trains: the given ones, else all (`sde_grpo`: all but the last)."""
        if train_denoising_steps is not None:
            return sorted(train_denoising_steps)
        return list(range(len(self.timesteps) - (1 if loss_type == "sde_grpo" else 0)))


@dataclass
class AnchorBatch:
    r"""
    The `K` anchors of each of `N` groups at one denoising step: what one forward of the policy sees.

    Args:
        group ([`RolloutGroup`]): the groups.
        step (`int`): the denoising step (index into `group.timesteps`).
        anchor_index (`torch.Tensor` of shape `[N, K]`): the anchors among each group's `G` candidates.
        rows (`torch.Tensor` of shape `[N * K]`): the same, as rows of the flattened `[N * G]` candidates.
        prefix_cache ([`KVCache`]): the groups' prefix, batch `N * K`.
        prompt_embeds (`torch.Tensor` of shape `[N * K, S, text_dim]`).
        iteration (`int`, *optional*): the inner update on an on-policy rollout (`0`: `θ = θ_old`), or `None` for
            replay-buffer groups (`π_old` is the reference).
    """

    group: RolloutGroup
    step: int
    anchor_index: torch.Tensor
    rows: torch.Tensor
    prefix_cache: KVCache
    prompt_embeds: torch.Tensor
    iteration: int | None = None

    @classmethod
    def draw(
        cls, group: RolloutGroup, num_anchors: int, generator: torch.Generator, iteration: int | None = None
    ) -> AnchorBatch:
        """`num_anchors` distinct candidates of every group, drawn from `generator` (at step 0; set `step` per step)."""
        n, g = group.states.shape[:2]
        anchor_index = torch.stack(
            [torch.randperm(g, generator=generator, device=generator.device)[:num_anchors] for _ in range(n)]
        ).to(group.states.device)  # [N, K]
        rows = anchor_index + torch.arange(n, device=anchor_index.device)[:, None] * g  # [N, K] into N * G
        return cls(
            group=group,
            step=0,
            anchor_index=anchor_index,
            rows=rows.flatten(),
            prefix_cache=group.prefix_cache.fork(num_anchors),
            prompt_embeds=group.prompt_embeds.repeat_interleave(num_anchors, dim=0),
            iteration=iteration,
        )

    @property
    def x_t(self) -> torch.Tensor:
        """The anchors' states at this step, `[N * K, C, Fc, H, W]`."""
        return self.group.states[:, :, self.step].flatten(0, 1)[self.rows]

    @property
    def advantages(self) -> torch.Tensor:
        """The anchors' advantages, `[N, K]`."""
        return self.group.advantages.gather(1, self.anchor_index)


EXPLORATIONS = ("neighbors", "sde")


@torch.no_grad()
def sample_group(
    pipeline: SelfForcingPipeline,
    spec: RolloutSpec,
    prompts: list[str],
    prompt_embeds: torch.Tensor,
    num_generations: int,
    generator: torch.Generator | None = None,
    pivot: int | None = None,
    exploration: str = "neighbors",
    fork_noise_scale: float = 0.5,
    temperature: float | None = None,
    distance_reduction: str = "mean",
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
        temperature (`float`, *optional*): a fixed `τ`; `None` takes each group's median distance between
            predictions ([`~trl_arcopo.loss.group_temperature`]).

    Returns:
        [`RolloutGroup`] with the finished `latents` `[N, G, C, F, H, W]`, without rewards.

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
    n, g, steps = len(prompts), num_generations, len(spec.timesteps)
    device = prompt_embeds.device
    shape = (n, *spec.latent_shape[1:])
    noise = RolloutNoise.sample(shape, spec.num_frames_per_chunk, steps, spec.sampler, generator, device=device)
    if pivot is None:
        pivot = int(torch.randint(noise.num_chunks, (1,), generator=generator, device=device).item())
    base = noise.chunk_initial(pivot)  # [N, C, Fc, H, W]
    branch_renoise = None
    if exploration == "neighbors":
        branch_noise = neighbor_noise(base, g, fork_noise_scale, generator)  # [N * G, C, Fc, H, W]
    else:
        branch_noise = base.repeat_interleave(g, dim=0)
        branch_renoise = torch.randn(
            (n * g, *noise.chunk_renoise(pivot).shape[1:]), generator=generator, device=device
        )  # [N * G, T - 1, C, Fc, H, W]
    fork = forked_rollout(
        pipeline,
        prompt_embeds,
        noise,
        pivot,
        branch_noise,
        spec.timesteps,
        spec.sigmas,
        shape[3],
        shape[4],
        spec.sampler,
        branch_renoise,
    )
    x0_preds = fork.x0_preds.unflatten(0, (n, g))  # [N, G, T, C, Fc, H, W]
    return RolloutGroup(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        pivot=pivot,
        frame_offset=pivot * spec.num_frames_per_chunk,
        prefix_cache=fork.prefix_cache,
        states=fork.states.unflatten(0, (n, g)),
        x0_preds=x0_preds.clone(),
        temperature=group_temperature(x0_preds, temperature, distance_reduction),
        timesteps=spec.timesteps,
        sigmas=spec.sigmas,
        latents=fork.latents.unflatten(0, (n, g)),
        num_forward_passes=fork.num_forward_passes,
    )
