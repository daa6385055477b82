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
Weight-free video metrics as rewards: motion magnitude, flicker and sharpness, computed in plain torch on the
trainer's `[N, F, C, H, W]` videos in `[0, 1]`. Cheap, deterministic, per video (a video's score never depends on its
batch mates); useful as regularisers next to a learned reward, and as the "dynamic degree" a preference can ask for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


# ITU-R BT.601 luma weights
_LUMA = (0.299, 0.587, 0.114)


def _check_videos(videos: torch.Tensor) -> None:
    if videos.ndim != 5:
        raise ValueError(f"`videos` must be [N, F, C, H, W] in [0, 1], got shape {tuple(videos.shape)}.")


def _luma(videos: torch.Tensor) -> torch.Tensor:
    """`[N, F, C, H, W]` -> `[N, F, H, W]`: luma for RGB, the channel mean otherwise."""
    _check_videos(videos)
    videos = videos.float()
    if videos.shape[2] == 3:
        weights = torch.tensor(_LUMA, device=videos.device).view(1, 1, 3, 1, 1)
        return (videos * weights).sum(dim=2)
    return videos.mean(dim=2)


def _needs_frames(videos: torch.Tensor, metric: str) -> None:
    if videos.shape[1] < 2:
        raise ValueError(f"{metric} compares consecutive frames: the videos have {videos.shape[1]} frame.")


class MotionMagnitudeReward:
    r"""
    How much the video moves: the mean absolute difference between consecutive frames, over pixels and channels,
    in `[0, 1]` (0 for a still video), times `scale` and clipped to `[0, 1]`.

    Args:
        scale (`float`, defaults to `1.0`): multiplies the raw magnitude, e.g. `10` to spread typical values
            (a few hundredths) over `[0, 1]`.
    """

    __name__ = "motion_magnitude"

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"`scale={scale}` must be positive.")
        self.scale = scale

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        _check_videos(videos)
        _needs_frames(videos, "Motion magnitude")
        videos = videos.float()
        magnitude = (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))  # [N]
        return (magnitude * self.scale).clamp(0, 1).tolist()


class FlickerReward:
    r"""
    Steadiness of the global brightness: `1 - mean |Δ mean luma|` between consecutive frames, in `[0, 1]` (1 for a
    video whose overall brightness does not jump; 0 for frames alternating between black and white). Moving objects
    change the mean luma only by their own area, so motion costs little; a flashing or pulsing frame costs a lot.
    """

    __name__ = "flicker"

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        luma = _luma(videos).mean(dim=(2, 3))  # [N, F]
        _needs_frames(videos, "Flicker")
        return (1 - (luma[:, 1:] - luma[:, :-1]).abs().mean(dim=1)).clamp(0, 1).tolist()


class SharpnessReward:
    r"""
    Detail of the frames: the variance of the Laplacian of the luma (the classic focus measure), averaged over the
    frames, times `scale` and clipped to `[0, 1]` (0 for flat frames). The Laplacian uses replicate padding, so a
    frame's border does not count as an edge.

    Args:
        scale (`float`, defaults to `1.0`): multiplies the raw variance (at most 16 for `[0, 1]` pixels: a
            one-pixel checkerboard), e.g. `10` for natural videos whose variance is a few hundredths.
    """

    __name__ = "sharpness"
    _KERNEL = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"`scale={scale}` must be positive.")
        self.scale = scale

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        luma = _luma(videos)  # [N, F, H, W]
        n, f, h, w = luma.shape
        frames = F.pad(luma.reshape(n * f, 1, h, w), (1, 1, 1, 1), mode="replicate")
        laplacian = F.conv2d(frames, self._KERNEL.to(luma.device).view(1, 1, 3, 3))  # [N * F, 1, H, W]
        variance = laplacian.flatten(1).var(dim=1, unbiased=False).view(n, f).mean(dim=1)  # [N]
        return (variance * self.scale).clamp(0, 1).tolist()
