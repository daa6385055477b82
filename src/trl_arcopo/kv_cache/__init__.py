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
Self-attention key/value caches for streaming (chunk-by-chunk) generation with a causal transformer, one per cache
policy: [`KVCache`] (`"full"`: every committed frame), [`RollingKVCache`] (`"rolling"`: sink frames and a ring of
recent frames, LongLive) and [`RecomputeKVCache`] (`"recompute"`: clean context latents whose keys and values are
rebuilt every chunk, Krea realtime). [`make_cache`] builds the one a generator's config names.
"""

from __future__ import annotations

import torch

from ..attention_window import CACHE_POLICIES, check_cache_policy, window_frames
from .full import CacheLayout, CommitForward, KVCache
from .recompute import RecomputeKVCache
from .rolling import RollingKVCache


__all__ = [
    "CACHE_POLICIES",
    "AnyKVCache",
    "CacheLayout",
    "CommitForward",
    "KVCache",
    "RecomputeKVCache",
    "RollingKVCache",
    "cache_from_state",
    "check_cache_policy",
    "make_cache",
    "window_frames",
]


#: A cache of any policy: what a pipeline's `prepare_cache` returns.
AnyKVCache = KVCache | RecomputeKVCache

_POLICY_CLASSES = {"full": KVCache, "rolling": RollingKVCache, "recompute": RecomputeKVCache}


def make_cache(
    policy: str,
    layout: CacheLayout,
    batch_size: int,
    num_frames: int,
    local_attn_frames: int | None = None,
    sink_frames: int = 0,
) -> AnyKVCache:
    """
    An empty cache of `policy` (`"full"`, `"rolling"` or `"recompute"`) and `layout` for `batch_size` videos that will
    commit `num_frames` latent frames (see each class's `empty`).

    Example:

    ```py
    >>> layout = pipe.transformer.cache_layout(latent_height=60, latent_width=104)
    >>> cache = make_cache("rolling", layout, 1, num_frames=240, local_attn_frames=12, sink_frames=3)
    ```
    """
    check_cache_policy(policy, local_attn_frames, sink_frames)
    return _POLICY_CLASSES[policy].empty(layout, batch_size, num_frames, local_attn_frames, sink_frames)


def cache_from_state(metadata: dict, tensors: dict[str, torch.Tensor]) -> AnyKVCache:
    """The cache whose [`~KVCache.state`] is `(metadata, tensors)` (a file written before policies existed: full)."""
    metadata = dict(metadata)
    policy = metadata.pop("policy", "full")
    if policy not in CACHE_POLICIES:
        raise ValueError(f"Unknown cache policy {policy!r} (expected one of {CACHE_POLICIES}).")
    layers = range(metadata.pop("num_layers"))
    keys = [tensors[f"keys.{i}"] for i in layers]
    values = [tensors[f"values.{i}"] for i in layers]
    tokens_per_frame = metadata.pop("tokens_per_frame")
    local, sink = metadata.pop("local_attn_frames", None), metadata.pop("sink_frames", 0)
    if policy == "recompute":
        kv = KVCache(keys, values, tokens_per_frame, keys[0].shape[1] if keys else 0)
        return RecomputeKVCache(
            kv, tensors.get("latents"), list(metadata["frame_indices"]), metadata["num_frames"],
            metadata["max_frames"], local, sink,
        )  # fmt: skip
    floor = metadata.get("floor", 0)
    if policy == "rolling":
        return RollingKVCache(
            keys,
            values,
            tokens_per_frame,
            metadata["end"],
            local,
            sink,
            floor=floor,
            max_tokens=metadata["max_tokens"],
        )
    return KVCache(keys, values, tokens_per_frame, metadata["end"], local, sink, floor=floor)
