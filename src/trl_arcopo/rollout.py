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
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .io_utils import atomic_path
from .kv_cache import AnyKVCache, cache_from_state
from .loss import group_advantages, group_temperature
from .sampling import RolloutNoise, SamplerType, neighbor_noise


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
        return len(first_chunk_schedule[0]) if chunk == 0 and first_chunk_schedule else len(timesteps)

    pivot_timesteps, pivot_sigmas = (
        first_chunk_schedule if pivot == 0 and first_chunk_schedule else (timesteps, sigmas)
    )

    # 1. Shared prefix, once per group: a cache of the prefix's chunks only
    cache = pipeline.prepare_cache(batch_size, pivot * frames, latent_height, latent_width)
    extra = {"first_chunk_schedule": first_chunk_schedule} if first_chunk_schedule else {}
    prefix = pipeline.generate_latents(
        prompt_embeds, noise, cache, timesteps, sigmas, sampler, start_chunk=0, end_chunk=pivot, **extra
    )  # [B, C, pivot * Fc, H, W]
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
    prefix_cache: AnyKVCache
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

    def save(self, path: str, settings: dict | None = None) -> None:
        """
        Write the group (without its video latents), prefix KV cache included, to one safetensors file, atomically:
        what a checkpoint taken between two inner updates needs to resume exactly. `settings` (the run's
        [`rollout_settings`]) are stored in the metadata, so that a resume can check them ([`saved_rollout_problems`]).
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
        cache_metadata, cache_tensors = self.prefix_cache.state()
        tensors |= {f"prefix_cache.{name}": tensor for name, tensor in cache_tensors.items()}
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        metadata = {
            "prompts": json.dumps(self.prompts),
            "pivot": str(self.pivot),
            "frame_offset": str(self.frame_offset),
            "nonfinite": json.dumps(self.nonfinite),
            "prefix_cache": json.dumps(cache_metadata),
        }
        if settings is not None:
            metadata["settings"] = json.dumps(settings)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> RolloutGroup:
        """
        Read a group written by [`~RolloutGroup.save`] (safetensors: no code runs while loading). A file whose tensors
        do not fit together ([`saved_rollout_problems`]) is refused with a `ValueError` naming each problem.
        """
        if problems := saved_rollout_problems(path):
            raise ValueError(
                f"{path} is not a usable rollout: {'; '.join(problems)}. It is damaged or was not written by "
                "`RolloutGroup.save`: resume from another checkpoint, or start a fresh `output_dir`."
            )
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        cache_tensors = {name[len("prefix_cache.") :]: tensors.pop(name) for name in list(tensors)
                         if name.startswith("prefix_cache.")}  # fmt: skip
        prefix_cache = cache_from_state(json.loads(metadata["prefix_cache"]), cache_tensors)
        return cls(
            prompts=json.loads(metadata["prompts"]),
            pivot=int(metadata["pivot"]),
            frame_offset=int(metadata["frame_offset"]),
            prefix_cache=prefix_cache,
            nonfinite=json.loads(metadata["nonfinite"]),
            **tensors,
        )


#: The run's settings a saved rollout records ([`RolloutGroup.save`]) and a resume checks: the rollout was made (`loss_type`,
#: `num_generations`, `per_device_train_batch_size`) and is updated on (`num_iterations`, `gradient_accumulation_steps`,
#: which place the checkpoint between two updates) with them.
ROLLOUT_SETTINGS = (
    "loss_type", "num_generations", "per_device_train_batch_size", "num_iterations", "gradient_accumulation_steps",
)  # fmt: skip
_ROLLOUT_TENSORS = ("prompt_embeds", "states", "x0_preds", "temperature", "timesteps", "sigmas")
_ROLLOUT_METADATA = ("prompts", "pivot", "frame_offset", "nonfinite", "prefix_cache")
_STATE_DIMS = (
    "prompts (batch)",
    "candidates (group size G)",
    "denoising steps",
    "channels",
    "frames",
    "rows",
    "columns",
)


def rollout_settings(args) -> dict:
    """The [`ROLLOUT_SETTINGS`] of a config, as a saved rollout records them."""
    return {name: getattr(args, name) for name in ROLLOUT_SETTINGS}


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def saved_rollout_problems(
    path: str, spec: RolloutSpec | None = None, settings: dict | None = None, pivot_chunk: int | None = None
) -> list[str]:
    """
    What keeps the rollout file `path` ([`RolloutGroup.save`]) from being updated on (an empty list: nothing), read
    from its header, metadata and schedule only: tensors whose shapes do not fit together (the batch, the group size
    `G`, the number of states and of `x̂0` predictions, the schedule, the prefix cache), a pivot that does not match
    its frame offset; and, given the current run's `spec` and [`rollout_settings`] `settings`, every difference from
    them (`field: saved ..., current ...`): the settings, the schedule's sigmas, the pivot chunk's latent shape, a
    pivot outside the video's chunks or other than a fixed `pivot_chunk`. A file saved before the settings were
    recorded is checked on its tensors only (the group size and batch are read from them; `loss_type`,
    `num_iterations` and `gradient_accumulation_steps` are not known).
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
            sigmas = f.get_tensor("sigmas").double() if "sigmas" in shapes else None
    except (OSError, SafetensorError) as error:
        return [f"it is not a readable safetensors file ({error})"]
    missing = [name for name in _ROLLOUT_TENSORS if name not in shapes] + [
        f"metadata {name!r}" for name in _ROLLOUT_METADATA if name not in metadata
    ]
    if missing:
        return [f"it lacks {', '.join(missing)}"]
    try:
        prompts, pivot = json.loads(metadata["prompts"]), int(metadata["pivot"])
        frame_offset = int(metadata["frame_offset"])
        cache = json.loads(metadata["prefix_cache"])
        saved_settings = json.loads(metadata["settings"]) if "settings" in metadata else None
        layers, tokens_per_frame, end = int(cache["num_layers"]), int(cache["tokens_per_frame"]), int(cache["end"])
    except (ValueError, TypeError, KeyError) as error:
        return [f"its metadata is unreadable ({type(error).__name__}: {error})"]

    problems = []
    states, x0_preds = shapes["states"], shapes["x0_preds"]
    if len(states) != 7:
        return [f"`states` has shape {states}, not [prompts, G, steps, C, frames, H, W]"]
    n, g, t = states[:3]
    if x0_preds != states:
        problems += [
            f"`states` has {a} {dim} but `x0_preds` has {b}"
            for dim, a, b in zip(_STATE_DIMS, states, x0_preds + [None] * (7 - len(x0_preds)))
            if a != b
        ] or [f"`x0_preds` has shape {x0_preds} but `states` {states}"]
    expected = {
        "temperature": [n, t], "timesteps": [t], "sigmas": [t + 1], "rewards": [n, g], "advantages": [n, g]
    }  # fmt: skip
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            problems.append(
                f"`{name}` has shape {shapes[name]}, but {n} prompts x {g} candidates x {t} steps need {shape}"
            )
    if len(prompts) != n or shapes["prompt_embeds"][:1] != [n]:
        problems.append(
            f"`states` holds {n} prompts but there are {len(prompts)} prompts and {shapes['prompt_embeds'][:1]} "
            "prompt embeddings"
        )
    if pivot < 0 or frame_offset != pivot * states[4]:
        problems.append(f"pivot {pivot} with chunks of {states[4]} frames does not start at frame {frame_offset}")
    policy = cache.get("policy", "full")
    if policy == "recompute":  # the context frames' keys; the committed frames are counted by `end`
        stored = len(cache.get("frame_indices", [])) * tokens_per_frame
    elif policy == "rolling":  # the window's frames, once anything is committed
        stored = min(end, int(cache.get("local_attn_frames") or 0) * tokens_per_frame)
    else:
        stored = end
    for i in range(layers):
        keys, values = shapes.get(f"prefix_cache.keys.{i}"), shapes.get(f"prefix_cache.values.{i}")
        if keys is None or keys != values or len(keys) < 2 or keys[0] != n or keys[1] < stored:
            problems.append(
                f"the prefix cache's layer {i} has keys {keys} and values {values}, not {n} prompts of at least "
                f"{stored} tokens each"
            )
    if end != frame_offset * tokens_per_frame:
        problems.append(f"the prefix cache ends at token {end}, not at the pivot's {frame_offset * tokens_per_frame}")
    if saved_settings is not None and saved_settings.get("num_generations", g) != g:
        problems.append(f"its settings say `num_generations={saved_settings['num_generations']}` but `states` has {g}")
    if spec is None or settings is None:
        return problems

    # against the current run
    saved = dict(saved_settings) if saved_settings is not None else {}
    saved.setdefault("num_generations", g)
    saved.setdefault("per_device_train_batch_size", n)
    for name, value in settings.items():
        if name in saved and saved[name] != value:
            problems.append(f"`{name}`: saved {saved[name]!r}, current {value!r}")
    current = spec.schedule(pivot)[1].double().cpu()
    if sigmas.shape != current.shape or not torch.allclose(sigmas, current, rtol=1e-6):
        problems.append(
            f"sigmas (the schedule from `denoising_sigmas`): saved {_rounded(sigmas.tolist())}, current "
            f"{_rounded(current.tolist())}"
        )
    chunk = [spec.latent_shape[1], spec.num_frames_per_chunk, *spec.latent_shape[3:]]
    if states[3:] != chunk:
        problems.append(
            f"the pivot chunk's latent shape [C, frames, H, W] (from `height`, `width`, `num_frames_per_chunk`): "
            f"saved {states[3:]}, current {chunk}"
        )
    if not 0 <= pivot < spec.num_chunks:
        problems.append(
            f"pivot: saved {pivot}, but the video has {spec.num_chunks} chunks (an index in [0, {spec.num_chunks}))"
        )
    if pivot_chunk is not None and pivot != pivot_chunk:
        problems.append(f"`pivot_chunk`: saved {pivot}, current {pivot_chunk}")
    return problems


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
        return self.first_chunk_schedule if chunk == 0 and self.first_chunk_schedule else (self.timesteps, self.sigmas)

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
        steps = min(len(spec.timesteps), len(spec.schedule(0)[0]))  # every pivot's schedule has them
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

    def trained_steps(
        self, loss_type: str = "arcopo", train_denoising_steps: list[int] | None = None, pivot: int | None = None
    ) -> list[int]:
        """
        The denoising steps an update of a group forked at `pivot` trains: the given ones, else all of the pivot's
        schedule (`sde_grpo`: all but the last).
        """
        if train_denoising_steps is not None:
            return sorted(train_denoising_steps)
        return list(range(len(self.schedule(pivot)[0]) - (1 if loss_type == "sde_grpo" else 0)))


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
    prefix_cache: AnyKVCache
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
        return cls.of(group, anchor_index, iteration)

    @classmethod
    def of(cls, group: RolloutGroup, anchor_index: torch.Tensor, iteration: int | None = None) -> AnchorBatch:
        """The anchors `anchor_index` `[N, K]` of every group (at step 0): their rows, prefix (read, not copied), text."""
        n, g = anchor_index.shape[0], group.num_generations
        k = anchor_index.shape[1]
        rows = anchor_index + torch.arange(n, device=anchor_index.device)[:, None] * g  # [N, K] into N * G
        return cls(
            group=group,
            step=0,
            anchor_index=anchor_index,
            rows=rows.flatten(),
            prefix_cache=group.prefix_cache.fork(k, num_frames=group.prefix_cache.num_frames),
            prompt_embeds=group.prompt_embeds.repeat_interleave(k, dim=0),
            iteration=iteration,
        )

    @property
    def num_anchors(self) -> int:
        return self.anchor_index.shape[1]

    def sub_batches(self, anchor_batch_size: int | None) -> list[AnchorBatch]:
        """
        The anchors in sub-batches of at most `anchor_batch_size` anchors of every group (`None`: one batch): each
        its own forward and backward in the update. The loss is a mean over anchors, so the sub-batches' losses
        weighted by their share of the anchors sum to the whole batch's.
        """
        k = self.num_anchors
        if anchor_batch_size is None or anchor_batch_size >= k:
            return [self]
        if anchor_batch_size < 1:
            raise ValueError(f"`anchor_batch_size={anchor_batch_size}` must be at least 1 (or None: every anchor).")
        return [
            replace(AnchorBatch.of(self.group, self.anchor_index[:, s : s + anchor_batch_size], self.iteration),
                    step=self.step)
            for s in range(0, k, anchor_batch_size)
        ]  # fmt: skip

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
    pipeline: StreamingGenerator,
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
        temperature (`float`, *optional*): a fixed `τ`; `None` takes each group's median distance between
            predictions ([`~trl_arcopo.loss.group_temperature`]).
        rollout_batch_size (`int`, *optional*): branches per forward ([`forked_rollout`]); the same group either way.
        branches (`slice`, *optional*): roll out only these candidates of each group (everything is drawn as for the
            whole group; a process's share when groups are split over processes): the group returned holds them,
            with the bits they have in the whole group. The temperature is left for the whole group
            ([`~trl_arcopo.loss.group_temperature`]). `None`: every candidate.

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
    x0_preds = fork.x0_preds.unflatten(0, (n, g))  # [N, G, T, C, Fc, H, W]
    return RolloutGroup(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        pivot=pivot,
        frame_offset=pivot * spec.num_frames_per_chunk,
        prefix_cache=fork.prefix_cache,
        states=fork.states.unflatten(0, (n, g)),
        x0_preds=x0_preds.clone(),
        temperature=group_temperature(x0_preds, temperature, distance_reduction) if branches is None else None,
        timesteps=spec.schedule(pivot)[0],
        sigmas=spec.schedule(pivot)[1],
        latents=fork.latents.unflatten(0, (n, g)),
        num_forward_passes=fork.num_forward_passes,
    )
