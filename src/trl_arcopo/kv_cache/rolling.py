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
"""The rolling KV cache (LongLive): the sink frames and a ring of the most recent frames of the window."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .full import CacheLayout, KVCache


@dataclass
class RollingKVCache(KVCache):
    r"""
    A [`KVCache`] under a local attention window that holds only what the window reads: the first `sink_frames` frames
    of the video and a ring of the `local_attn_frames - sink_frames` most recent committed frames (LongLive's cache).
    Its memory does not grow with the video's length.

    Keys are stored after RoPE at their absolute positions, as in [`KVCache`]; a frame's slot is its index for a sink
    frame and `sink + (index - sink) % ring` after. A read gathers the frames in the video's order, so every chunk
    attends to exactly the keys and values of a full [`KVCache`] with the same window, bit for bit.

    Args:
        max_tokens (`int`): tokens of the video this cache may commit after `offset` (its capacity; the storage stays
            `local_attn_frames` frames, or none when `max_tokens` is 0).
        (others): as [`KVCache`]; `local_attn_frames` is required.

    Example:

    ```py
    >>> layout = pipe.transformer.cache_layout(latent_height=60, latent_width=104)
    >>> cache = RollingKVCache.empty(layout, 1, num_frames=240, local_attn_frames=12, sink_frames=3)  # 12 frames stored
    ```
    """

    max_tokens: int = 0

    policy = "rolling"

    def __post_init__(self):
        if self.local_attn_frames is None:
            raise ValueError(
                "A rolling cache needs `local_attn_frames` (the sink plus the recent frames a chunk attends to); "
                "use the `full` policy for global attention."
            )
        super().__post_init__()
        stored = self.keys[0].shape[1] if self.keys else 0
        if stored not in (0, self.local_attn_frames * self.tokens_per_frame):
            raise ValueError(
                f"A rolling cache stores {self.local_attn_frames} frames ({self.local_attn_frames * self.tokens_per_frame}"
                f" tokens) or none, not {stored} tokens."
            )

    @classmethod
    def empty(
        cls, layout: CacheLayout, batch_size: int, num_frames: int, local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> RollingKVCache:  # fmt: skip
        """As [`KVCache.empty`]; the storage holds `local_attn_frames` frames whatever `num_frames`."""
        if local_attn_frames is None:
            raise ValueError("A rolling cache needs `local_attn_frames`; use the `full` policy for global attention.")
        stored = local_attn_frames if num_frames > 0 else 0
        return cls(
            layout.buffers(batch_size, stored), layout.buffers(batch_size, stored), layout.tokens_per_frame, 0,
            local_attn_frames, sink_frames, max_tokens=num_frames * layout.tokens_per_frame,
        )  # fmt: skip

    @property
    def capacity_tokens(self) -> int:
        return self.offset + self.max_tokens

    @property
    def _sink_tokens(self) -> int:
        return self.sink_frames * self.tokens_per_frame

    @property
    def _ring_tokens(self) -> int:
        return (self.local_attn_frames - self.sink_frames) * self.tokens_per_frame

    def check_chunk(self, start: int, num_tokens: int, batch_size: int, commit: bool = False) -> None:
        super().check_chunk(start, num_tokens, batch_size, commit)
        if num_tokens > self._ring_tokens:
            raise ValueError(
                f"A chunk of {num_tokens // self.tokens_per_frame} frames does not fit the window of "
                f"`local_attn_frames={self.local_attn_frames}` with `sink_frames={self.sink_frames}`: the window must "
                "hold the sink frames plus at least one chunk."
            )

    def _slots(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The storage ranges `(lo, hi)` holding the video's tokens `[start, stop)`, in the video's order."""
        sink, ring = self._sink_tokens, self._ring_tokens
        slots = [(start, min(stop, sink))] if start < sink else []
        position = max(start, sink)
        while position < stop:
            slot = sink + (position - sink) % ring
            size = min(stop - position, sink + ring - slot)
            slots.append((slot, slot + size))
            position += size
        return slots

    def _own_pieces(self, layer: int, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sink, held = self._sink_tokens, max(self.end - self._ring_tokens, self.offset)
        if max(start, sink) < min(stop, held):  # ring frames older than the window
            raise ValueError(
                f"Frames {start // self.tokens_per_frame}..{stop // self.tokens_per_frame - 1} left the rolling window "
                f"(it holds the {self.sink_frames} sink frames and frames from {held // self.tokens_per_frame} on): "
                "a chunk reads only its window."
            )
        return [(self.keys[layer][:, lo:hi], self.values[layer][:, lo:hi]) for lo, hi in self._slots(start, stop)]

    def _store(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        position = 0
        for lo, hi in self._slots(start, start + key.shape[1]):
            size = hi - lo
            self.keys[layer][:, lo:hi] = key[:, position : position + size].detach()
            self.values[layer][:, lo:hi] = value[:, position : position + size].detach()
            position += size

    def _own_tokens(self, capacity: int, end: int) -> int:
        return self.local_attn_frames * self.tokens_per_frame if capacity > end else 0

    def _fork_fields(self, capacity: int) -> dict:
        return {"max_tokens": capacity - self.end}

    def materialize(self) -> RollingKVCache:
        """The same cache with the frames its window still reads in its own storage (a fork's prefix copied)."""
        if self.prefix is None:
            return self
        tokens = self.local_attn_frames * self.tokens_per_frame
        batch = self.batch_size
        cache = replace(
            self,
            keys=[k.new_zeros((batch, tokens, *k.shape[2:])) for k in self.keys],
            values=[v.new_zeros((batch, tokens, *v.shape[2:])) for v in self.values],
            prefix=None, offset=0, max_tokens=self.capacity_tokens, end=0,
        )  # fmt: skip
        held = [
            slice(0, min(self._sink_tokens, self.end)),
            slice(max(self._sink_tokens, self.end - self._ring_tokens, self.floor), self.end),
        ]
        held = [s for s in held if s.stop > s.start]
        for layer in range(self.num_layers):
            for tokens_ in held:
                k, v = self._gather(layer, [tokens_])
                cache._store(layer, tokens_.start, k, v)
        cache.end = self.end
        return cache

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        metadata, tensors = super().state()
        metadata["max_tokens"] = self.capacity_tokens
        return metadata, tensors
