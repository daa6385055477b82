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
"""Frame selection and image preprocessing for reward models, in plain torch on `[N, F, C, H, W]` videos in `[0, 1]`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


#: The normalisation of OpenAI CLIP (and of PickScore and the LAION aesthetic predictor, which reuse its encoder).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FRAME_POLICIES = ("first", "uniform", "fps")


def frame_indices(
    num_frames: int, policy: str = "uniform", k: int = 4, fps: float | None = None, video_fps: float = 16.0
) -> list[int]:
    """
    Which frames a reward model sees: `"first"` (frame 0), `"uniform"` (`k` frames evenly spaced from the first to the
    last; all of them if the video is shorter) or `"fps"` (one frame every `video_fps / fps` frames, from frame 0).
    """
    if num_frames < 1:
        raise ValueError(f"The videos have {num_frames} frames.")
    if policy == "first":
        return [0]
    if policy == "uniform":
        if k < 1:
            raise ValueError(f"`k={k}` frames: take at least 1.")
        if k >= num_frames:
            return list(range(num_frames))
        return torch.linspace(0, num_frames - 1, k).round().long().tolist()
    if policy == "fps":
        if fps is None or not 0 < fps <= video_fps:
            raise ValueError(f"`fps={fps}` must be in (0, video_fps={video_fps}] for the 'fps' frame policy.")
        return list(range(0, num_frames, max(1, round(video_fps / fps))))
    raise ValueError(f"`frames={policy!r}` is not a frame policy; use one of {FRAME_POLICIES}.")


def resize_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`images` `[B, 3, H, W]` resized to `size` in float32, bicubic and antialiased (as PIL and torchvision resize)."""
    return F.interpolate(images.float(), size, mode="bicubic", align_corners=False, antialias=True)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`images` `[B, 3, H, W]` clamped to `[0, 1]` and standardised per channel: `(x - mean) / std`."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean_t) / std_t


def resize_center_crop(
    images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """
    CLIP's image preprocessing: `images` `[B, 3, H, W]` in `[0, 1]` resized (bicubic, antialiased) so that the short
    side is `size`, center-cropped to `size × size`, clamped to `[0, 1]` and normalised. Returns `[B, 3, size, size]`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}.")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = resize_bicubic(images, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return normalize(resized[..., top : top + size, left : left + size], mean, std)
