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
The attention window of a streaming generator and the cache policies that hold it, as plain settings (no torch: the
planner reads them too): which committed frames a chunk attends to, and which policy and window work together.
"""

from __future__ import annotations


#: How a cache holds the committed frames: every one, a ring of the window, or the window's latents recomputed.
CACHE_POLICIES = ("full", "rolling", "recompute")


def window_frames(num_frames: int, chunk_frames: int, local_attn_frames: int | None, sink_frames: int) -> list[int]:
    """
    The committed frames the chunk after `num_frames` committed frames (of `chunk_frames` frames) attends to: the
    first `sink_frames` frames and the `local_attn_frames - sink_frames - chunk_frames` most recent ones; every frame
    without a window.
    """
    if local_attn_frames is None:
        return list(range(num_frames))
    recent = max(local_attn_frames - sink_frames - chunk_frames, 0)
    return [f for f in range(num_frames) if f < sink_frames or f >= num_frames - recent]


def check_cache_policy(policy: str, local_attn_frames: int | None, sink_frames: int) -> None:
    """Raise a `ValueError` naming the value for a policy or window that cannot work together."""
    if policy not in CACHE_POLICIES:
        raise ValueError(f"`cache_policy={policy!r}` is not one of {CACHE_POLICIES}.")
    if sink_frames < 0:
        raise ValueError(f"`sink_frames={sink_frames}` must be at least 0.")
    if policy == "rolling" and local_attn_frames is None:
        raise ValueError(
            "`cache_policy='rolling'` needs `local_attn_frames` (the sink plus recent frames a chunk attends to, e.g. "
            "12 for LongLive); use `cache_policy='full'` for global attention."
        )
    if local_attn_frames is not None and local_attn_frames <= sink_frames:
        raise ValueError(
            f"`local_attn_frames={local_attn_frames}` must be larger than `sink_frames={sink_frames}`: the window "
            "holds the sink frames plus at least the current chunk."
        )
