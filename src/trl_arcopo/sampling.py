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
"""Few-step samplers for streaming flow-matching generators, and the explicit noise of a rollout."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor


SamplerType = Literal["consistency", "ode"]
SAMPLERS = ("consistency", "ode")

#: Self-Forcing's 4 steps before the shift-5 warp; after it: timesteps [1000, 937.5, 833.3, 625].
SELF_FORCING_SIGMAS = (1.0, 0.75, 0.5, 0.25)


def check_sampler(sampler: str, name: str = "sampler") -> None:
    """Refuse a sampler name that is not one of `SAMPLERS`, naming the argument (`name`) and the choices."""
    if sampler not in SAMPLERS:
        raise ValueError(f"`{name}={sampler!r}` is not a sampler; use one of {SAMPLERS}.")


def self_forcing_scheduler(shift: float = 5.0) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler whose `set_timesteps(sigmas=[1, .75, .5, .25])` gives Self-Forcing's warped 4-step schedule."""
    return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)


def check_sigmas(sigmas, name: str = "sigmas") -> list[float]:
    """`sigmas` as a list, or a `ValueError` naming the field `name`: a schedule is non-empty, strictly decreasing, in (0, 1]."""
    sigmas = list(sigmas)
    if not sigmas or any(not 0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"`{name}={sigmas}` must be a non-empty, strictly decreasing list in (0, 1].")
    return sigmas


def get_schedule(
    scheduler: FlowMatchEulerDiscreteScheduler, sigmas: list[float] | tuple[float, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The denoising schedule of one chunk, from the scheduler (its `shift` applies to `sigmas`).

    Returns:
        `(timesteps, sigmas)`: `timesteps` `[T]` in `[0, 1000]` and `sigmas` `[T + 1]` ending with `0`, both fp32.
    """
    sigmas = check_sigmas(SELF_FORCING_SIGMAS if sigmas is None else sigmas)
    scheduler.set_timesteps(sigmas=sigmas, device="cpu")
    return scheduler.timesteps.float().clone(), scheduler.sigmas.float().clone()


def chunk_schedule(
    chunk: int,
    schedule: tuple[torch.Tensor, torch.Tensor],
    first_chunk_schedule: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(timesteps, sigmas)` of chunk `chunk`: `first_chunk_schedule` for chunk 0 when there is one, else `schedule`."""
    return first_chunk_schedule if chunk == 0 and first_chunk_schedule is not None else schedule


def x0_from_velocity(x_t: torch.Tensor, sigma: float | torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Clean estimate `x̂0 = x_t - σ·v` of flow matching (`x_t = (1 - σ)·x0 + σ·ε`, `v = ε - x0`), computed in fp64."""
    return (x_t.double() - sigma * velocity.double()).to(x_t.dtype)


def consistency_step(x0: torch.Tensor, sigma_next: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Self-Forcing / DMD re-noise: `x_{j+1} = (1 - σ')·x̂0 + σ'·η` with fresh Gaussian `η`."""
    return (1 - sigma_next) * x0 + sigma_next * noise


def ode_step(
    x_t: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, velocity: torch.Tensor
) -> torch.Tensor:
    """Deterministic Euler step of the flow-matching ODE: `x_{j+1} = x_t + (σ' - σ)·v`."""
    return (x_t.double() + (sigma_next - sigma) * velocity.double()).to(x_t.dtype)


def neighbor_noise(
    base: torch.Tensor, num: int, scale: float, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """
    `num` neighbours of each noise in `base` `[B, ...]`: `sqrt(1 - s²)·ε + s·δ`, `δ ~ N(0, I)`, each still standard
    normal, with correlation `1 - s²` (Neighbor GRPO / AR-CoPO exploration). Returns `[B * num, ...]`, neighbours of
    `base[0]` first.
    """
    if not 0 <= scale <= 1:
        raise ValueError(f"The neighbour noise scale must be in [0, 1], got {scale}.")
    expanded = base.repeat_interleave(num, dim=0)  # [B * num, ...]
    delta = randn_tensor(expanded.shape, generator=generator, device=base.device, dtype=base.dtype)
    return math.sqrt(1 - scale**2) * expanded + scale * delta


@dataclass
class RolloutNoise:
    r"""
    Every random tensor of a streaming rollout, drawn up front so that it can be replayed, shared by the branches of a
    group and replaced for one chunk.

    Args:
        initial (`torch.Tensor` of shape `[B, C, F, H, W]`):
            The initial noise of every chunk (chunk `c` is `initial[:, :, c * Fc : (c + 1) * Fc]`).
        renoise (`torch.Tensor` of shape `[B, L, T - 1, C, Fc, H, W]`, *optional*):
            The fresh noise `η_{c, j}` of the consistency sampler's re-noise after step `j` of chunk `c`; `None` for
            the deterministic ODE sampler.
        num_frames_per_chunk (`int`):
            `Fc`, latent frames per chunk.
    """

    initial: torch.Tensor
    renoise: torch.Tensor | None
    num_frames_per_chunk: int

    @property
    def batch_size(self) -> int:
        return self.initial.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.initial.shape[2] // self.num_frames_per_chunk

    @classmethod
    def sample(
        cls,
        shape: tuple[int, int, int, int, int],
        num_frames_per_chunk: int,
        num_steps: int,
        sampler: SamplerType = "consistency",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RolloutNoise:
        """
        Draw the noise of a rollout of latent shape `[B, C, F, H, W]` from `generator`, in a fixed order: the initial
        noise of the whole video (unless `latents` is given), then the re-noise of chunk 0 step 0, chunk 0 step 1, ...
        chunk by chunk. Drawing lazily in the same order would give the same tensors.
        """
        check_sampler(sampler)
        b, c, f, h, w = shape
        if f % num_frames_per_chunk:
            raise ValueError(f"{f} latent frames are not a multiple of `num_frames_per_chunk={num_frames_per_chunk}`.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
        elif tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` must have shape {list(shape)} ([B, C, F, H, W]), got {list(latents.shape)}.")
        renoise = None
        if sampler == "consistency" and num_steps > 1:
            chunk_shape = (b, c, num_frames_per_chunk, h, w)
            draws = [
                randn_tensor(chunk_shape, generator=generator, device=latents.device, dtype=latents.dtype)
                for _ in range(f // num_frames_per_chunk)
                for _ in range(num_steps - 1)
            ]
            renoise = torch.stack(draws, dim=1).unflatten(1, (f // num_frames_per_chunk, num_steps - 1))
        return cls(latents, renoise, num_frames_per_chunk)  # renoise: [B, L, T - 1, C, Fc, H, W]

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.num_frames_per_chunk, (chunk + 1) * self.num_frames_per_chunk)

    def chunk_initial(self, chunk: int) -> torch.Tensor:
        return self.initial[:, :, self.chunk_slice(chunk)]  # [B, C, Fc, H, W]

    def chunk_renoise(self, chunk: int, num_steps: int | None = None) -> torch.Tensor | None:
        """
        The re-noise of chunk `chunk`, `[B, T - 1, C, Fc, H, W]`; with `num_steps`, of its first `num_steps - 1`
        steps (a chunk with a shorter schedule than the longest, e.g. every chunk after a longer first one).
        """
        if self.renoise is None:
            return None
        return self.renoise[:, chunk] if num_steps is None else self.renoise[:, chunk, : max(num_steps - 1, 0)]

    def with_chunk_initial(self, chunk: int, noise: torch.Tensor) -> RolloutNoise:
        """A copy whose chunk `chunk` starts from `noise` `[B, C, Fc, H, W]`; everything else is shared."""
        initial = self.initial.clone()
        initial[:, :, self.chunk_slice(chunk)] = noise
        return replace(self, initial=initial)

    def with_chunk_renoise(self, chunk: int, renoise: torch.Tensor) -> RolloutNoise:
        """A copy whose chunk `chunk` re-noises with `renoise` `[B, T - 1, C, Fc, H, W]`; everything else is shared."""
        if self.renoise is None:
            raise ValueError("This noise has no re-noise (ODE sampler): nothing to replace.")
        new = self.renoise.clone()
        new[:, chunk, : renoise.shape[1]] = renoise  # a chunk with fewer steps than the longest fills the first ones
        return replace(self, renoise=new)

    def repeat_interleave(self, n: int) -> RolloutNoise:
        """Each rollout's noise repeated `n` times: `B -> B * n` (the shared noise of a group's branches)."""
        renoise = None if self.renoise is None else self.renoise.repeat_interleave(n, dim=0)
        return replace(self, initial=self.initial.repeat_interleave(n, dim=0), renoise=renoise)

    def narrow(self, start: int, length: int) -> RolloutNoise:
        """The noise of the rollouts `[start, start + length)`, as views (nothing is copied)."""
        renoise = None if self.renoise is None else self.renoise.narrow(0, start, length)
        return replace(self, initial=self.initial.narrow(0, start, length), renoise=renoise)

    def select(self, indices: torch.Tensor | list[int]) -> RolloutNoise:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.initial.device)
        renoise = None if self.renoise is None else self.renoise.index_select(0, index)
        return replace(self, initial=self.initial.index_select(0, index), renoise=renoise)
