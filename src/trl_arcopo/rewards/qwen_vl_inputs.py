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
Qwen2-VL inputs in plain torch, laid out as transformers' Qwen2-VL processors lay them out: [`smart_resize`], CLIP
normalisation, temporal padding and [`patchify`] to the flat `pixel_values(_videos)` layout with its `(_)grid_thw`,
and [`build_text_inputs`] (the chat text with the placeholder expanded to `grid.prod() / merge²` tokens,
`attention_mask`, `mm_token_type_ids`); [`prepare_inputs`] does both for a batch of videos or images. No torchvision
and no image processor are involved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .frames import (
    CLIP_MEAN,
    CLIP_STD,
    normalize,
    quantize_8bit,
    resize_bicubic,
    resize_bicubic_pil,
    resize_bicubic_uint8,
)


PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Height and width are multiples of `PATCH_SIZE * MERGE_SIZE`: one merged token covers 28 × 28 pixels.
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE
#: qwen-vl-utils' default lower bound on the pixels of a video frame (frames are upscaled to reach it).
VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
#: `mm_token_type_ids` of the placeholder tokens (0 is text), as transformers' processors set them.
MM_TOKEN_TYPES = {"image": 1, "video": 2}
#: How frames are resized: see [`resize_normalize`].
RESAMPLE_MODES = ("float", "uint8", "pil")
_SYSTEM_PROMPT = "You are a helpful assistant."


# ---------------------------------------------------------------------------------------------- input preparation
def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """
    Qwen2-VL's resize rule: the `(height, width)` closest to the input's with both multiples of `factor`, keeping
    the aspect ratio; if that has more than `max_pixels` pixels, both sides shrink by `sqrt(pixels / max_pixels)` and
    round down, else if fewer than `min_pixels`, both grow and round up (qwen-vl-utils' `smart_resize`).
    """
    if min(height, width) < 1:
        raise ValueError(f"Cannot resize a {height}x{width} frame: both sides must be at least 1 pixel.")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"A {height}x{width} frame has an aspect ratio over 200, which Qwen2-VL does not take.")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"`min_pixels={min_pixels}` and `max_pixels={max_pixels}` must satisfy 0 < min <= max.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_vl_frame_indices(
    num_frames: int,
    video_fps: float = 16.0,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    frame_factor: int = TEMPORAL_PATCH_SIZE,
) -> list[int]:
    """
    qwen-vl-utils' video sampling at `fps` frames per second of a video shot at `video_fps`: the count is
    `num_frames / video_fps * fps`, clamped to `[min_frames, min(max_frames, num_frames)]` and rounded to a multiple
    of `frame_factor`; the frames are spread evenly from the first to the last (`linspace(...).round()`).
    """
    if fps <= 0 or video_fps <= 0:
        raise ValueError(f"`fps={fps}` and `video_fps={video_fps}` must be positive.")
    low = math.ceil(min_frames / frame_factor) * frame_factor
    high = math.floor(min(max_frames, num_frames) / frame_factor) * frame_factor
    count = round(min(max(num_frames / video_fps * fps, low), high) / frame_factor) * frame_factor
    count = min(count, num_frames)
    if count < frame_factor:
        raise ValueError(
            f"A video of {num_frames} frames is too short to sample: Qwen2-VL video input needs at least "
            f"{frame_factor} frames."
        )
    return torch.linspace(0, num_frames - 1, count).round().long().tolist()


def resize_normalize(
    frames: torch.Tensor,
    size: tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resample: str = "float",
) -> torch.Tensor:
    """
    `frames` `[B, 3, H, W]` in `[0, 1]` resized to `size`, clamped to `[0, 1]` and normalised with Qwen2-VL's (OpenAI
    CLIP's) mean and std: `[B, 3, h, w]`. A frame already of `size` is not resampled. `resample`:

    - `"float"`: torch's bicubic antialiased interpolation of the float frames (the default: no 8-bit rounding);
    - `"uint8"`: the frames rounded to 8-bit levels, interpolated by the same kernel and rounded to 8 bits again, as
      torchvision resizes a decoded `uint8` video (VideoAlign's reference);
    - `"pil"`: the frames rounded to 8-bit levels and resized exactly as PIL's `Image.resize(..., BICUBIC)` resizes an
      8-bit image ([`~trl_arcopo.rewards.frames.resize_bicubic_pil`]; HPSv3's reference).
    """
    if resample == "float":
        frames = frames.float() if tuple(frames.shape[-2:]) == tuple(size) else resize_bicubic(frames, size)
    elif resample == "uint8":
        frames = resize_bicubic_uint8(quantize_8bit(frames), size) / 255
    elif resample == "pil":
        frames = resize_bicubic_pil(quantize_8bit(frames), size) / 255
    else:
        raise ValueError(f"`resample={resample!r}` must be one of {RESAMPLE_MODES}.")
    return normalize(frames, mean, std)


def patchify(
    videos: torch.Tensor,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The flat patch layout of Qwen2-VL's processors.

    Args:
        videos (`torch.Tensor` of shape `[N, T, C, H, W]`): normalised, `H` and `W` multiples of
            `patch_size * merge_size`. Images are `T = 1`. `T` is padded to a multiple of `temporal_patch_size` by
            repeating the last frame (so an image becomes two identical frames, the image processor's layout).

    Returns:
        `pixel_values` `[N * t * gh * gw, C * temporal_patch_size * patch_size²]` (`t = ceil(T / temporal)`,
        `gh = H / patch_size`, `gw = W / patch_size`): per video, rows run over `(t, gh / m, gw / m, m, m)` (the
        `m × m` patches a merged token covers are consecutive) and columns over `(C, temporal, patch_y, patch_x)`;
        and `grid_thw` `[N, 3]` (`t, gh, gw`), int64.
    """
    n, frames, channels, height, width = videos.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(
            f"Frames of {height}x{width} pixels are not multiples of {factor}: resize with `smart_resize`."
        )
    if pad := -frames % temporal_patch_size:
        videos = torch.cat([videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    t, gh, gw = (frames + pad) // temporal_patch_size, height // patch_size, width // patch_size
    patches = videos.reshape(
        n, t, temporal_patch_size, channels, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size,
        patch_size,
    )  # fmt: skip
    # [N, t, gh/m, gw/m, m, m, C, temporal, patch_y, patch_x]
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = patches.reshape(n * t * gh * gw, channels * temporal_patch_size * patch_size * patch_size)
    grid_thw = torch.tensor([[t, gh, gw]] * n, dtype=torch.long)
    return pixel_values, grid_thw


def chat_text(text: str, media: str) -> str:
    """
    One user turn, a `media` (`"image"` or `"video"`) then `text`, rendered by the Qwen2-VL-Instruct chat template
    with its default system prompt and the generation prompt (what `apply_chat_template(..., tokenize=False,
    add_generation_prompt=True)` returns), with one `<|image_pad|>` / `<|video_pad|>` placeholder.
    """
    if media not in MM_TOKEN_TYPES:
        raise ValueError(f"`media={media!r}` must be 'image' or 'video'.")
    return (
        f"<|im_start|>system\n{_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|{media}_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def prompt_criteria(medium: str) -> dict[str, str]:
    """
    The criteria lines VideoAlign's and HPSv3's prompts share word for word (HPSv3's derives from VideoAlign's), about
    a `medium` (`"video"` or `"image"`); trailing spaces are part of the trained prompts.
    """
    return {
        "reasonableness": f"- **Reasonableness:** The {medium} should not contain any significant biological or "
        "logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "clarity": f"- **Clarity:** Evaluate the sharpness and visibility of the {medium}. The image should be clear "
        "and easy to interpret, with no blurring or indistinct areas.",
        "detail": "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
        "visual elements (e.g., hair, clothing, shadows).",
        "aesthetic": f"- **Aesthetic and Creativity:** Assess the artistic aspects of the {medium}, including the "
        "color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
        "convey a sense of harmony and balance.",
        "safety": f"- **Safety:** The {medium} should not contain harmful or inappropriate content, such as "
        "political, violent, or adult material. If such content is present, the image quality and satisfaction "
        "score should be the lowest possible. ",
        "alignment": f"Assess how well the {medium} matches the textual prompt across the following sub-dimensions:",
        "subject": f"- **Subject Relevance** Evaluate how accurately the subject(s) in the {medium} (e.g., person, "
        "animal, object) align with the textual description. The subject should match the description in terms of "
        "number, appearance, and behavior.",
        "style": "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
        f"how well the {medium} adheres to this style.",
    }


def build_text_inputs(tokenizer, texts: Sequence[str], media: str, num_media_tokens: int) -> dict[str, torch.Tensor]:
    """
    Tokenise [`chat_text`] of each text (no special tokens added) and expand its placeholder to `num_media_tokens`
    copies (`grid_thw.prod() // merge_size**2`, as the processor does). Returns `input_ids`, `attention_mask` and
    `mm_token_type_ids` (1 on image, 2 on video placeholders, 0 elsewhere), each `[B, L]`, right-padded with the
    tokenizer's pad token (padding follows every real token, so it changes no score under the causal mask).
    """
    placeholder = f"<|{media}_pad|>"
    pad_id = tokenizer.pad_token_id
    media_id = tokenizer.convert_tokens_to_ids(placeholder)
    if pad_id is None or media_id is None or media_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer needs a pad token and the special token {placeholder!r} (Qwen2-VL's).")
    rows = tokenizer([chat_text(text, media) for text in texts], add_special_tokens=False)["input_ids"]
    expanded = []
    for text, row in zip(texts, rows):
        where = [i for i, token in enumerate(row) if token == media_id]
        if len(where) != 1:
            raise ValueError(f"The text {text[:80]!r} must not contain {placeholder!r} itself.")
        expanded.append(row[: where[0]] + [media_id] * num_media_tokens + row[where[0] + 1 :])
    length = max(len(row) for row in expanded)
    input_ids = torch.full((len(expanded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(expanded), length), dtype=torch.long)
    for i, row in enumerate(expanded):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    mm_token_type_ids = (input_ids == media_id).long() * MM_TOKEN_TYPES[media] * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


def prepare_inputs(
    tokenizer,
    visuals: torch.Tensor,
    texts: Sequence[str],
    media: str,
    min_pixels: int,
    max_pixels: int,
    device: torch.device | str | None = None,
    resample: str = "float",
) -> dict[str, torch.Tensor]:
    """
    The model inputs of `B` pairs: `visuals` `[B, T, 3, H, W]` in `[0, 1]` (`T` frames of a video, `T = 1` for an
    image) resized by [`smart_resize`] to the same size (by `resample`, see [`resize_normalize`]), normalised and
    patchified, and the `B` texts. Returns
    `input_ids`, `attention_mask`, `mm_token_type_ids` and `pixel_values_videos` / `video_grid_thw` (or
    `pixel_values` / `image_grid_thw`), on `device`.
    """
    if visuals.ndim != 5 or visuals.shape[2] != 3 or len(texts) != visuals.shape[0]:
        raise ValueError(
            f"`visuals` must be [B, T, 3, H, W] with one text each, got shape {tuple(visuals.shape)} and "
            f"{len(texts)} texts."
        )
    b, t = visuals.shape[:2]
    size = smart_resize(*visuals.shape[-2:], min_pixels=min_pixels, max_pixels=max_pixels)
    frames = resize_normalize(visuals.flatten(0, 1).to(device), size, resample=resample)
    frames = frames.unflatten(0, (b, t))  # [B, T, 3, h, w]
    pixel_values, grid_thw = patchify(frames)
    inputs = build_text_inputs(tokenizer, texts, media, int(grid_thw[0].prod()) // MERGE_SIZE**2)
    prefix = "pixel_values_videos" if media == "video" else "pixel_values"
    inputs.update({prefix: pixel_values, f"{media}_grid_thw": grid_thw})
    return {key: value.to(device) for key, value in inputs.items()}
