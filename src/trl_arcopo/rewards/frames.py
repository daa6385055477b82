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

import functools
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
    last; all of them if the video is shorter) or `"fps"` (a stride: one frame every `video_fps / fps` frames, from
    frame 0). VideoAlign and HPSv3 sample as qwen-vl-utils does instead: a count of frames from `fps`, spread evenly
    (`qwen_vl_inputs.qwen_vl_frame_indices`).
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


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """`images` in `[0, 1]` as the 8-bit levels a file holds: `round(clamp(x, 0, 1) * 255)`, float32 in `[0, 255]`."""
    return (images.float().clamp(0, 1) * 255).round()


def resize_bicubic_uint8(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    torchvision's resize of a `uint8` image tensor (bicubic, antialiased): `levels` `[B, C, H, W]` (8-bit levels, see
    [`quantize_8bit`]) interpolated in float32 by torch's kernel, clamped to `[0, 255]` and rounded back to levels.
    """
    if tuple(levels.shape[-2:]) == tuple(size):
        return levels.float()
    return resize_bicubic(levels, size).clamp(0, 255).round()


#: PIL's fixed-point precision for 8-bit images (`PRECISION_BITS` of libImaging/Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


def _pil_bicubic_filter(x: float) -> float:
    """PIL's bicubic kernel (`a = -0.5`, support 2), in double precision as libImaging evaluates it."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _pil_bicubic_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    PIL's 8-bit resampling coefficients from `in_size` to `out_size` pixels (`precompute_coeffs` and
    `normalize_coeffs_8bpc` of libImaging/Resample.c, in the same double arithmetic: the support scaled by the
    downscale factor, the weights normalised to sum 1, then fixed point with `PRECISION_BITS = 22`, rounded half away
    from zero). Returns the input index `[out_size, K]` and the integer weight `[out_size, K]` (float64) of each tap;
    taps past a window's end point at its last pixel with weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inv_filterscale = 1.0 / filterscale
    one = 1 << _PIL_PRECISION_BITS
    starts, windows = [], []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_pil_bicubic_filter((x + xmin - center + 0.5) * inv_filterscale) for x in range(xmax)]
        total = 0.0
        for w in weights:  # summed in order, as in C
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        starts.append(xmin)
        windows.append([int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in weights])
    taps = max(len(window) for window in windows)
    index = torch.tensor([[min(start + k, in_size - 1) for k in range(taps)] for start in starts])
    weight = torch.tensor([window + [0] * (taps - len(window)) for window in windows], dtype=torch.float64)
    return index, weight


def _pil_pass(levels: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass of PIL's 8-bit resampling along the last dimension: fixed-point sums, rounded and clipped to levels."""
    index, weight = (t.to(levels.device) for t in _pil_bicubic_taps(levels.shape[-1], out_size))
    # integer levels times integer weights below 2**23, summed: exact in float64 whatever the order
    sums = torch.full((*levels.shape[:-1], out_size), float(1 << (_PIL_PRECISION_BITS - 1)), dtype=torch.float64,
                      device=levels.device)  # fmt: skip
    for k in range(index.shape[1]):
        sums += levels.index_select(-1, index[:, k]) * weight[:, k]
    return torch.floor(sums / (1 << _PIL_PRECISION_BITS)).clamp(0, 255)


def resize_bicubic_pil(levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    PIL's `Image.resize(size, Image.BICUBIC)` of an 8-bit RGB image, reproduced exactly in torch: `levels`
    `[B, C, H, W]` (8-bit levels, see [`quantize_8bit`]) resampled horizontally then vertically (vertically first
    where Pillow 13 does, [`_pil_vertical_first`]), each pass with PIL's
    antialiased bicubic kernel in 22-bit fixed point, rounded and clipped to `[0, 255]` (so the intermediate image is
    8-bit too, as in PIL). A side whose size does not change is not resampled. Returns float32 levels `[B, C, h, w]`.
    """
    if levels.ndim != 4:
        raise ValueError(f"`levels` must be [B, C, H, W], got shape {tuple(levels.shape)}.")
    height, width = size
    out = levels.double()
    passes = [
        (width != out.shape[-1], lambda x: _pil_pass(x, width)),
        (height != out.shape[-2], lambda x: _pil_pass(x.transpose(-1, -2), height).transpose(-1, -2)),
    ]
    if _pil_vertical_first(tuple(out.shape[-2:]), size):
        passes.reverse()
    for needed, resample in passes:
        if needed:
            out = resample(out)
    return out.float()


def _pil_vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """
    Whether PIL resamples vertically first: Pillow 13 does when the height shrinks and the width grows (checked on
    such sizes against PIL); earlier versions always go horizontally first. The order matters because the
    intermediate image is rounded to 8 bits. Follows the installed Pillow, or Pillow 13's order without it.
    """
    if not (out_size[0] < in_size[0] and out_size[1] > in_size[1]):
        return False
    try:
        import PIL
    except ImportError:
        return True
    return int(PIL.__version__.split(".")[0]) >= 13


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`images` `[B, 3, H, W]` clamped to `[0, 1]` and standardised per channel: `(x - mean) / std`."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean_t) / std_t


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """
    The `(height, width)` an image is resized to when its short side becomes `size`: the long side is
    `int(size * long / short)`, truncated (transformers' `get_resize_output_image_size(..., default_to_square=False)`,
    which `CLIPImageProcessor` uses, and torchvision's `Resize(size)`). A 480x854 frame becomes 224x398, not 224x399.
    """
    if min(height, width) < 1 or size < 1:
        raise ValueError(f"Cannot resize a {height}x{width} image to a short side of {size}: sizes must be positive.")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize_center_crop(
    images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """
    CLIP's image preprocessing: `images` `[B, 3, H, W]` in `[0, 1]` resized (bicubic, antialiased) so that the short
    side is `size` (the long side truncated, [`shortest_edge_size`]), center-cropped to `size × size` (offsets
    `(new - size) // 2`), clamped to `[0, 1]` and normalised. Returns `[B, 3, size, size]`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [B, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}.")
    new_h, new_w = shortest_edge_size(*images.shape[-2:], size)
    resized = resize_bicubic(images, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return normalize(resized[..., top : top + size, left : left + size], mean, std)
