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
How a video's frames map to latent frames and back, for a VAE of temporal factor `t`: a causal video VAE (Wan's)
makes latent frame 0 from frame 0 and latent frame `f` from frames `t·f - t + 1 .. t·f`; frame packing
(`FramePackingAutoencoder`) makes latent frame `f` from frames `t·f .. t·f + t - 1`. Torch-free: the pipeline and the
planner both read it.
"""

from __future__ import annotations


def latent_num_frames(num_frames: int, temporal_factor: int, frame_packing: bool = False) -> int:
    """The latent frames of a `num_frames`-frame video, or a `ValueError` naming `num_frames` and a valid one."""
    t = temporal_factor
    if frame_packing:
        if num_frames < t or num_frames % t:
            raise ValueError(
                f"`num_frames={num_frames}` must be a positive multiple of the frame packing's "
                f"`scale_factor_temporal={t}` (e.g. {max(t, num_frames // t * t)})."
            )
        return num_frames // t
    if t == 1:
        return num_frames
    if (num_frames - 1) % t:
        raise ValueError(
            f"`num_frames={num_frames}` must be 1 + a multiple of the VAE's temporal factor {t} (e.g. 81)."
        )
    return (num_frames - 1) // t + 1


def pixel_num_frames(latent_frames: int, temporal_factor: int, frame_packing: bool = False) -> int:
    """The `num_frames` that gives `latent_frames` latent frames (the inverse of [`latent_num_frames`])."""
    t = temporal_factor
    return latent_frames * t if frame_packing or t == 1 else (latent_frames - 1) * t + 1


def pixel_frame_range(start: int, stop: int, temporal_factor: int, frame_packing: bool = False) -> tuple[int, int]:
    """The decoded frames `[start', stop')` made from the latent frames `[start, stop)`."""
    t = temporal_factor
    if t == 1 or stop <= start:
        return start, stop
    if frame_packing:
        return start * t, stop * t
    return (0 if start == 0 else t * start - (t - 1)), t * stop - (t - 1)
