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
What the parity fixtures' generator (run in the reference's environment) and `tests/test_parity.py` (run in ours)
share: the inputs, made bit for bit the same everywhere from integer arithmetic (numpy only, no RNG whose stream could
change between versions), and the text constants. It imports nothing but numpy and hashlib.
"""

from __future__ import annotations

import hashlib

import numpy as np


PROMPTS = ["a red fox jumps over a fence in the snow", "a café at night, neon {signs} reflecting in the rain"]
#: VideoAlign's input: 2 videos of 8 frames at 360x640 (16 fps); at 2 fps the reference samples 4 frames of each,
#: and `max_frame_pixels = 128 * 28 * 28` (qwen-vl-utils' minimum for videos) sizes them to 224x420 (a downscale by
#: about 1.6, so antialiasing matters).
VIDEOALIGN_SHAPE = (2, 8, 360, 640)
VIDEOALIGN_MAX_PIXELS = 128 * 28 * 28
VIDEO_FPS = 16.0
#: HPSv3's inputs: per group, videos of 2 frames, each frame scored as an image resized to about 256 * 28 * 28
#: pixels: 480x832 -> 336x588 (a downscale) and 240x416 -> 364x616 (an upscale).
HPSV3_SHAPES = ((2, 2, 480, 832), (1, 2, 240, 416))
#: Qwen2-VL-2B/7B-Instruct's chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a deterministic hash of each value."""
    x = values.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def make_videos(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """
    8-bit RGB videos `[N, F, H, W, 3]`: moving triangle-wave gradients (a different direction and speed per video and
    channel) plus hashed noise of +-24 levels, in integer arithmetic only.
    """
    n, frames, height, width = shape
    v, t, y, x, c = np.ogrid[:n, :frames, :height, :width, :3]
    phase = (3 + v + c) * x + (2 + 2 * c - v) * y + (9 + 5 * v) * t * (1 + c) + 97 * c + 211 * v
    wave = 255 - np.abs(phase % 510 - 255)
    index = (((v * frames + t) * height + y) * width + x) * 3 + c
    offset = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    noise = _splitmix64(index.astype(np.uint64) + offset) % np.uint64(49)
    return np.clip(wave + noise.astype(np.int64) - 24, 0, 255).astype(np.uint8)


def videoalign_videos() -> np.ndarray:
    return make_videos(VIDEOALIGN_SHAPE, seed=1)


def hpsv3_videos() -> list[np.ndarray]:
    return [make_videos(shape, seed=2 + i) for i, shape in enumerate(HPSV3_SHAPES)]


def sha256(array) -> str:
    """The sha256 of an array's bytes (C order), with its dtype and shape, so that a changed layout fails too."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()
