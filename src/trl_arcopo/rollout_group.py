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
The group a training step learns from ([`RolloutGroup`]: a forked group's pivot-chunk trajectories, rewards and
prefix cache), its file in a checkpoint and the checks a resume runs on it, and the anchors of one update
([`AnchorBatch`]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .io_utils import atomic_path
from .kv_cache import AnyKVCache, cache_from_state
from .loss import group_advantages


if TYPE_CHECKING:
    from .rollout import RolloutSpec


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
        timesteps (`torch.Tensor` of shape `[T]`), sigmas (`torch.Tensor` of shape `[T + 1]`).
        temperature (`torch.Tensor` of shape `[N, T]`, *optional*): `τ` of each group and step, the loss's
            ([`~trl_arcopo.loss.LossStrategy`]); the trainer sets it from the old predictions before the rewards.
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
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    temperature: torch.Tensor | None = None
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
        if (
            nonfinite is None
            and temperature is not None
            and not (torch.isfinite(temperature).all() and (temperature > 0).all())
        ):
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
        } | ({} if self.temperature is None else {"temperature": self.temperature.mean().item()})

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
            "timesteps": self.timesteps,
            "sigmas": self.sigmas,
        }
        if self.temperature is not None:
            tensors["temperature"] = self.temperature
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
