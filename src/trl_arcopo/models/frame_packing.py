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
"""A parameter-free, lossless "autoencoder" that packs consecutive frames (and pixel blocks) into channels."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

from ..latent_frames import latent_num_frames


class FramePackingAutoencoder(ModelMixin, ConfigMixin):
    r"""
    Space-time-to-depth as a pipeline's `vae`: `scale_factor_temporal` consecutive frames and
    `scale_factor_spatial`² neighbouring pixels become the channels of one latent pixel, exactly and invertibly.

    For a pixel-space streaming generator this divides the transformer's token count by `scale_factor_temporal ×
    scale_factor_spatial²` at the same patch size, and with `scale_factor_temporal` equal to the frames of a chunk,
    one latent frame *is* one chunk. Unlike Wan's VAE there is no causal first frame: `F` frames give
    `F / scale_factor_temporal` latent frames.

    Latents are `[B, z_dim, F / t, H / s, W / s]` with `z_dim = in_channels · t · s²`, channel index
    `(c · t + τ) · s² + i · s + j` for colour `c`, frame `τ` within the group and pixel `(i, j)` within the block.
    Pixels are kept as they are (`latents_mean` 0, `latents_std` 1), so a video in `[-1, 1]` has latents in `[-1, 1]`.

    Args:
        in_channels (`int`, defaults to 3): colour channels of the video.
        scale_factor_temporal (`int`, defaults to 3): frames per latent frame.
        scale_factor_spatial (`int`, defaults to 1): pixels per latent pixel along each side.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        scale_factor_temporal: int = 3,
        scale_factor_spatial: int = 1,
        z_dim: int | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ):
        super().__init__()
        if min(in_channels, scale_factor_temporal, scale_factor_spatial) < 1:
            raise ValueError(
                f"`in_channels={in_channels}`, `scale_factor_temporal={scale_factor_temporal}` and "
                f"`scale_factor_spatial={scale_factor_spatial}` must all be at least 1."
            )
        packed = in_channels * scale_factor_temporal * scale_factor_spatial**2
        if z_dim is not None and z_dim != packed:
            raise ValueError(f"`z_dim={z_dim}` must be in_channels x t x s² = {packed}, or left unset.")
        if (latents_mean is not None and list(latents_mean) != [0.0] * packed) or (
            latents_std is not None and list(latents_std) != [1.0] * packed
        ):
            raise ValueError("The frame packing is exact: `latents_mean` must be 0 and `latents_std` 1 (or unset).")
        # The pipeline reads these like Wan's VAE config; the packing is exact, so no normalisation.
        self.register_to_config(z_dim=packed, latents_mean=[0.0] * packed, latents_std=[1.0] * packed)
        # A buffer gives the module a device, a dtype and a weights file (it has no parameters).
        self.register_buffer("dtype_anchor", torch.zeros(()))

    def latent_num_frames(self, num_frames: int) -> int:
        """Latent frames of a `num_frames`-frame video (raises if `num_frames` does not divide)."""
        return latent_num_frames(num_frames, self.config.scale_factor_temporal, frame_packing=True)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video `[B, C, F, H, W]` to latents `[B, C·t·s², F/t, H/s, W/s]`."""
        b, c, f, h, w = video.shape
        t, s = self.config.scale_factor_temporal, self.config.scale_factor_spatial
        if c != self.config.in_channels:
            raise ValueError(f"Expected {self.config.in_channels} channels, got a video of shape {list(video.shape)}.")
        self.latent_num_frames(f)
        if h % s or w % s:
            raise ValueError(f"Frame size {h}x{w} is not divisible by `scale_factor_spatial={s}`.")
        x = video.reshape(b, c, f // t, t, h // s, s, w // s, s)  # [B, C, F/t, t, H/s, s, W/s, s]
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, t, s, s, F/t, H/s, W/s]
        return x.reshape(b, c * t * s * s, f // t, h // s, w // s)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents `[B, z_dim, F', H', W']` to the video `[B, C, F'·t, H'·s, W'·s]`."""
        b, k, f, h, w = z.shape
        t, s, c = self.config.scale_factor_temporal, self.config.scale_factor_spatial, self.config.in_channels
        if k != self.config.z_dim:
            raise ValueError(f"Expected {self.config.z_dim} latent channels, got latents of shape {list(z.shape)}.")
        x = z.reshape(b, c, t, s, s, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, F', t, H', s, W', s]
        video = x.reshape(b, c, f * t, h * s, w * s)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Encode then decode (the identity, exactly)."""
        return self.decode(self.encode(video), return_dict=False)[0]
