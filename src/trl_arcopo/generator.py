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
The streaming generator interface: what the rollout, the update, the replay buffer and the trainer need from a
generator ([`StreamingGenerator`]), the check the trainer runs ([`check_generator`]), and the chunk loop every
generator shares ([`StreamingGeneratorMixin`]), written once on top of one method a generator provides: `velocity`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .kv_cache import AnyKVCache, KVCache
from .sampling import (
    RolloutNoise,
    SamplerType,
    check_sampler,
    chunk_schedule,
    consistency_step,
    get_schedule,
    ode_step,
    x0_from_velocity,
)


@dataclass
class ChunkDenoisingOutput:
    r"""
    Result of denoising one chunk.

    Args:
        x0 (`torch.Tensor` of shape `[B, C, Fc, H, W]`): the chunk's output (the last step's clean estimate).
        states (`torch.Tensor` of shape `[B, T, C, Fc, H, W]`, *optional*): the state `x_t` fed to each step.
        x0_preds (`torch.Tensor` of shape `[B, T, C, Fc, H, W]`, *optional*): the clean estimate `x̂0` of each step.
    """

    x0: torch.Tensor
    states: torch.Tensor | None = None
    x0_preds: torch.Tensor | None = None


@dataclass
class PromptSchedule:
    r"""
    Prompts that change during a video (interactive generation): from chunk `c` on, the prompt is `switches[c]`; before
    the first switch, the `prompt_embeds` given to [`~StreamingGeneratorMixin.generate_latents`].

    Args:
        switches (`dict[int, torch.Tensor]`): chunk -> prompt embeddings `[B, S, text_dim]` from that chunk on.
        recache (`bool`, defaults to `True`): at a switch, re-encode what the next chunk reads (the sink and the
            recent frames) under the new prompt before it is denoised (LongLive's re-cache); `False` keeps the keys
            and values made under the old prompt. A recompute cache rebuilds its context under each commit's prompt
            either way.
        interpolation_chunks (`int`, defaults to `1`): blend the old prompt into the new one over this many chunks,
            `lerp(old, new, w)` with `w = linspace(0, 1, n)` (Krea realtime's interpolation); `1` switches at once.
    """

    switches: dict[int, torch.Tensor]
    recache: bool = True
    interpolation_chunks: int = 1

    def __post_init__(self):
        if self.interpolation_chunks < 1:
            raise ValueError(f"`interpolation_chunks={self.interpolation_chunks}` must be at least 1 (1: no blend).")
        if any(c < 1 for c in self.switches):
            raise ValueError(
                f"Switch chunks {sorted(self.switches)} must be at least 1: chunk 0's prompt is the first."
            )

    def embeds_at(self, chunk: int, initial: torch.Tensor) -> torch.Tensor:
        """The prompt embeddings of chunk `chunk` `[B, S, text_dim]`, `initial` before the first switch."""
        previous, current, start = initial, initial, 0
        for c in sorted(self.switches):
            if c > chunk:
                break
            previous, current, start = current, self.switches[c].to(initial), c
        n = self.interpolation_chunks
        if start == 0 or n == 1 or chunk - start >= n:
            return current
        return torch.lerp(previous, current, (chunk - start) / (n - 1))


@runtime_checkable
class StreamingGenerator(Protocol):
    r"""
    What [`~trl_arcopo.ARCoPOTrainer`] needs from a streaming generator. [`~trl_arcopo.SelfForcingPipeline`] is one;
    `docs/adding_a_generator.md` writes another in one file. A `diffusers.DiffusionPipeline` subclass with
    [`StreamingGeneratorMixin`] has every member once it defines `velocity`, `encode_prompt`, `latent_shape`,
    `prepare_cache` and `decode_latents`.

    - `transformer`: the denoiser the LoRA policy is added to (a diffusers `ModelMixin` with `PeftAdapterMixin`).
    - `text_encoder`, `vae`: frozen modules (`None` allowed); `components`, `to`, `_execution_device`, `config`
      (`default_height`, `default_width`, `default_num_frames`, `default_num_frames_per_chunk`, `default_sampler`,
      `default_sigmas`): as any `DiffusionPipeline`.
    - the methods below, with the signatures of [`~trl_arcopo.SelfForcingPipeline`]'s.
    """

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None

    def encode_prompt(self, prompt, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def latent_shape(
        self, batch_size: int, height: int, width: int, num_frames: int, num_frames_per_chunk: int
    ) -> tuple[int, int, int, int, int]: ...

    def prepare_cache(
        self, batch_size: int, num_latent_frames: int, latent_height: int, latent_width: int
    ) -> AnyKVCache: ...

    def get_schedule(self, sigmas: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def denoise_chunk(self, noise, prompt_embeds, kv_cache, frame_offset, timesteps, sigmas, *args, **kwargs): ...

    def commit_chunk(self, x0, prompt_embeds, kv_cache, frame_offset, *args, **kwargs) -> None: ...

    def predict_x0(self, x_t, timestep, sigma, prompt_embeds, kv_cache, frame_offset, *args, **kwargs): ...

    def generate_latents(self, prompt_embeds, noise, kv_cache, timesteps, sigmas, *args, **kwargs): ...

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pt", batch_size: int | None = None): ...


#: Every member of [`StreamingGenerator`], and what uses it (the error of [`check_generator`] names them).
GENERATOR_MEMBERS = {
    "transformer": "the denoiser the LoRA policy is added to",
    "text_encoder": "frozen during training (may be None)",
    "vae": "frozen during training (may be None)",
    "config": "the default video size, chunking, sampler and schedule",
    "components": "moved to the training device",
    "to": "moved to the training device",
    "_execution_device": "where caches and noise are made",
    "encode_prompt": "prompt embeddings, once per prompt",
    "latent_shape": "the latent video of a height, width and frame count",
    "prepare_cache": "an empty cache of the committed chunks",
    "get_schedule": "the per-chunk denoising schedule",
    "denoise_chunk": "the pivot chunk's trajectory",
    "commit_chunk": "the clean pass that commits a chunk",
    "predict_x0": "the update's forward with gradients",
    "generate_latents": "the prefix and the branches' completion",
    "decode_latents": "the videos the rewards score",
}


def missing_generator_members(pipeline: Any) -> list[str]:
    """The [`GENERATOR_MEMBERS`] `pipeline` lacks (an empty list: it is a [`StreamingGenerator`])."""
    missing = []
    for name in GENERATOR_MEMBERS:
        try:
            inspect.getattr_static(pipeline, name)  # without running properties (`_execution_device`)
        except AttributeError:
            missing.append(name)
    return missing


def check_generator(pipeline: Any) -> None:
    """Raise a `TypeError` naming each member of [`StreamingGenerator`] that `pipeline` lacks, and what needs it."""
    if missing := missing_generator_members(pipeline):
        lines = "; ".join(f"`{name}` ({GENERATOR_MEMBERS[name]})" for name in missing)
        raise TypeError(
            f"`pipeline` ({type(pipeline).__name__}) is not a streaming generator: it lacks {lines}. Subclass "
            "`diffusers.DiffusionPipeline` with `trl_arcopo.StreamingGeneratorMixin` and define the missing members "
            "(see docs/adding_a_generator.md), or use `SelfForcingPipeline`."
        )


class StreamingGeneratorMixin:
    r"""
    The chunk loop of a streaming generator, written once: the schedule, denoising a chunk with a few-step sampler,
    the clean pass that commits it, the update's `x̂0`, and streaming a whole video. A generator provides:

    - `velocity(x, timestep, prompt_embeds, kv_cache, frame_offset, negative_prompt_embeds=None, guidance_scale=1.0,
      update_cache=False, attention_kwargs=None, transformer=None)`: the flow velocity `[B, C, Fc, H, W]` of the chunk
      `x` starting at latent frame `frame_offset`, reading the committed frames of `kv_cache` (a [`KVCache`] as
      `kv_cache.attention_cache(frame_offset)` gives it) and, with `update_cache=True`, writing the chunk's keys and
      values; `transformer` replaces `self.transformer` for the call (e.g. wrapped for distributed training);
    - `self.scheduler` (a flow-matching scheduler, for [`get_schedule`]) and `self.config.default_sigmas`.
    """

    velocity: Callable[..., torch.Tensor]

    def pixel_frame_range(self, start: int, stop: int) -> tuple[int, int]:
        """
        The decoded video's frames `[start', stop')` that the latent frames `[start, stop)` become: the same frames
        for a generator without a temporal VAE factor (override it otherwise).
        """
        return start, stop

    def get_schedule(self, sigmas: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `(timesteps [T], sigmas [T + 1])` of one chunk, from the scheduler (see [`trl_arcopo.sampling.get_schedule`]);
        `sigmas=None` uses the pipeline's `default_sigmas`.
        """
        if sigmas is None:
            sigmas = getattr(self.config, "default_sigmas", None)
        return get_schedule(self.scheduler, sigmas)

    def get_first_chunk_schedule(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """
        The first chunk's `(timesteps, sigmas)` when the config's `default_first_chunk_sigmas` gives it its own
        (Causal-Forcing++: 4 steps for the first chunk, 1 or 2 for the others), else `None`: the first chunk uses
        [`get_schedule`]'s.
        """
        sigmas = getattr(self.config, "default_first_chunk_sigmas", None)
        return None if sigmas is None else get_schedule(self.scheduler, sigmas)

    def predict_x0(
        self,
        x_t: torch.Tensor,
        timestep: float | torch.Tensor,
        sigma: float | torch.Tensor,
        prompt_embeds: torch.Tensor,
        kv_cache: AnyKVCache,
        frame_offset: int,
        **velocity_kwargs: Any,
    ) -> torch.Tensor:
        """
        The clean estimate `x̂0 = x_t - σ·v_θ(x_t, t)` `[B, C, Fc, H, W]` of a chunk starting at latent frame
        `frame_offset`, attending to the committed frames in `kv_cache` (nothing is committed). Runs with gradients
        when they are enabled. `denoise_chunk` computes every step with the same two calls, so a recorded `x̂0`
        and its recomputation are equal bit for bit. `velocity_kwargs` go to `velocity` as they are:
        `negative_prompt_embeds`, `guidance_scale`, `attention_kwargs`, and `transformer`, which replaces
        `self.transformer` for this call (e.g. the same module wrapped for distributed training).
        """
        velocity = self.velocity(
            x_t, timestep, prompt_embeds, kv_cache, frame_offset, update_cache=False, **velocity_kwargs
        )
        return x0_from_velocity(x_t, sigma, velocity)

    def denoise_chunk(
        self,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        kv_cache: AnyKVCache,
        frame_offset: int,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        renoise: torch.Tensor | None = None,
        sampler: SamplerType = "consistency",
        record_trajectory: bool = False,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> ChunkDenoisingOutput:
        """
        Denoise one chunk from its initial `noise` `[B, C, Fc, H, W]` with `len(timesteps)` steps.

        `sampler="consistency"` (Self-Forcing): `x̂0 = x - σ·v`, then `x ← (1 - σ')·x̂0 + σ'·renoise[:, j]`;
        `sampler="ode"`: Euler steps of the flow ODE. The output is the last step's `x̂0`. With
        `record_trajectory=True` the per-step states and clean estimates are returned too (what AR-CoPO stores).
        """
        check_sampler(sampler)
        num_steps = len(timesteps)
        if sampler == "consistency" and num_steps > 1 and (renoise is None or renoise.shape[1] != num_steps - 1):
            raise ValueError(
                f"The consistency sampler needs `renoise` of shape [B, {num_steps - 1}, C, Fc, H, W] for {num_steps} "
                "steps; draw it with `RolloutNoise.sample`."
            )
        x = noise
        states, x0_preds = [], []
        for j in range(num_steps):
            sigma, sigma_next = sigmas[j].item(), sigmas[j + 1].item()
            velocity = self.velocity(
                x, timesteps[j], prompt_embeds, kv_cache, frame_offset, negative_prompt_embeds, guidance_scale,
                False, attention_kwargs,
            )  # fmt: skip
            x0 = x0_from_velocity(x, sigma, velocity)
            if record_trajectory:
                states.append(x)
                x0_preds.append(x0)
            if j < num_steps - 1:
                x = (
                    consistency_step(x0, sigma_next, renoise[:, j])
                    if sampler == "consistency"
                    else ode_step(x, sigma, sigma_next, velocity)
                )
        if not record_trajectory:
            return ChunkDenoisingOutput(x0=x0)
        return ChunkDenoisingOutput(x0=x0, states=torch.stack(states, 1), x0_preds=torch.stack(x0_preds, 1))

    def commit_chunk(
        self,
        x0: torch.Tensor,
        prompt_embeds: torch.Tensor,
        kv_cache: AnyKVCache,
        frame_offset: int,
        negative_prompt_embeds: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Commit the clean chunk `x0` `[B, C, Fc, H, W]` to `kv_cache`: run it at `t = 0` and write its keys/values
        (a recompute cache keeps its latents and rebuilds the next chunk's context instead).
        """
        with torch.no_grad():
            kv_cache.commit(
                x0, frame_offset, self._commit_forward(prompt_embeds, negative_prompt_embeds, attention_kwargs)
            )

    def _commit_forward(
        self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None, attention_kwargs
    ) -> Callable[[torch.Tensor, KVCache, int], None]:
        """The clean pass a cache calls to write a chunk's keys and values (`t = 0`, no guidance)."""

        def forward(x: torch.Tensor, cache: KVCache, offset: int) -> None:
            self.velocity(x, 0.0, prompt_embeds, cache, offset, negative_prompt_embeds, 1.0, True, attention_kwargs)

        return forward

    def recache(
        self,
        kv_cache: AnyKVCache,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        num_frames_per_chunk: int,
        negative_prompt_embeds: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """
        Re-encode what the next chunk reads under `prompt_embeds` (a prompt switch): the clean `latents`
        `[B, C, F, H, W]` of every committed frame are committed again, block by block, the sink and the recent frames
        of the window only ([`~trl_arcopo.kv_cache.KVCache.recache`]); a recompute cache rebuilds its context.
        """
        forward = self._commit_forward(prompt_embeds, negative_prompt_embeds, attention_kwargs)
        with torch.no_grad():
            kv_cache.recache(latents, forward, num_frames_per_chunk)

    def generate_latents(
        self,
        prompt_embeds: torch.Tensor,
        noise: RolloutNoise,
        kv_cache: AnyKVCache,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        sampler: SamplerType = "consistency",
        start_chunk: int = 0,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        attention_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        end_chunk: int | None = None,
        callback_on_chunk_end: Callable[[Any, int], None] | None = None,
        first_chunk_schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
        prompt_schedule: PromptSchedule | None = None,
    ) -> torch.Tensor:
        """
        Stream chunks `start_chunk..end_chunk-1` (by default to the last chunk) from `noise`, committing to `kv_cache`
        (which must already hold the chunks before `start_chunk`) each chunk it has room for: a cache sized for the
        video less its last chunk ([`prepare_cache`]) skips that chunk's commit pass, which no later chunk would read.
        Returns the generated chunks concatenated along frames `[B, C, F', H, W]` (no frames when the range is empty).
        `callback_on_chunk_end(self, c)` runs after chunk `c` is committed (the last chunk: denoised), before the next
        chunk starts. `first_chunk_schedule` `(timesteps, sigmas)` denoises chunk 0 with its own schedule
        ([`get_first_chunk_schedule`]); the noise must then have the re-noise of the longer of the two.
        `prompt_schedule` ([`PromptSchedule`]) changes the prompt at given chunks (a re-cache needs the video from
        chunk 0: `start_chunk=0`).
        """
        chunks = []
        frames = noise.num_frames_per_chunk
        end_chunk = noise.num_chunks if end_chunk is None else end_chunk
        needed = min(end_chunk, noise.num_chunks - 1) * frames  # frames that later chunks read
        if kv_cache.capacity_frames < needed:
            raise ValueError(
                f"The KV cache is too short for the requested video: it can commit {kv_cache.capacity_frames} latent "
                f"frames but later chunks read the first {needed}. Create it with `num_frames>={needed}` (the "
                "video's frames less its last chunk, which is never committed)."
            )
        if prompt_schedule is not None and prompt_schedule.recache and start_chunk > 0:
            raise ValueError(
                f"A prompt switch with `recache=True` re-encodes committed frames, which a call from chunk "
                f"{start_chunk} does not have: generate from chunk 0, or set `recache=False`."
            )
        iterator = range(start_chunk, end_chunk)
        if progress:
            iterator = self.progress_bar(iterator)
        initial_embeds = prompt_embeds
        for c in iterator:
            if prompt_schedule is not None:
                prompt_embeds = prompt_schedule.embeds_at(c, initial_embeds)
                if prompt_schedule.recache and c in prompt_schedule.switches and chunks:
                    self.recache(
                        kv_cache, torch.cat(chunks, dim=2), prompt_embeds, frames, negative_prompt_embeds,
                        attention_kwargs,
                    )  # fmt: skip
            chunk_timesteps, chunk_sigmas = chunk_schedule(c, (timesteps, sigmas), first_chunk_schedule)
            out = self.denoise_chunk(
                noise.chunk_initial(c),
                prompt_embeds,
                kv_cache,
                c * frames,
                chunk_timesteps,
                chunk_sigmas,
                renoise=noise.chunk_renoise(c, len(chunk_timesteps)),
                sampler=sampler,
                negative_prompt_embeds=negative_prompt_embeds,
                guidance_scale=guidance_scale,
                attention_kwargs=attention_kwargs,
            )
            if kv_cache.capacity_frames >= (c + 1) * frames:  # a cache sized without the video's last chunk
                self.commit_chunk(
                    out.x0, prompt_embeds, kv_cache, c * frames, negative_prompt_embeds, attention_kwargs
                )
            chunks.append(out.x0)
            if callback_on_chunk_end is not None:
                callback_on_chunk_end(self, c)
        if not chunks:
            return noise.initial[:, :, :0]
        return torch.cat(chunks, dim=2)
