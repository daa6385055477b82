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
"""The recomputed KV cache (Krea realtime): clean context latents whose keys and values are rebuilt every chunk."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..attention_window import window_frames
from .full import CacheLayout, CommitForward, KVCache


@dataclass
class RecomputeKVCache:
    r"""
    The clean latents of the frames a chunk attends to, whose keys and values are rebuilt every chunk (Krea realtime's
    `recompute_kv_cache`): the first `sink_frames` frames of the video and the `local_attn_frames - sink_frames - Fc`
    most recent ones (every committed frame when `local_attn_frames` is `None`).

    Committing a chunk appends its clean latents, keeps the context of the next chunk, and runs that context through
    the transformer at `t = 0`, block-causally in chunks of `Fc` frames from its first frame, at the *relative*
    positions `0..k-1`; the next chunk then sits at position `k`. This equals one full forward over the context frames
    with a block-causal mask (Krea's `_prepare_blockwise_causal_attn_mask`), and holds memory for `k` frames whatever
    the video's length, at the price of a forward over the context per chunk. The context attends to itself under the
    current prompt, so a prompt change reaches the context at the next commit.

    Args:
        kv ([`KVCache`]): the rebuilt keys and values of the context (a full cache of `k` frames; empty at the start).
        latents (`torch.Tensor` of shape `[B, C, k, H, W]`, *optional*): the context's clean latents.
        frame_indices (`list[int]`): the video frame of each context frame.
        num_frames (`int`): frames committed so far.
        max_frames (`int`): frames this cache may commit (its capacity).
        local_attn_frames (`int`, *optional*), sink_frames (`int`): the window, as in [`KVCache`].
    """

    kv: KVCache
    latents: torch.Tensor | None = None
    frame_indices: list[int] = field(default_factory=list)
    num_frames: int = 0
    max_frames: int = 0
    local_attn_frames: int | None = None
    sink_frames: int = 0

    policy = "recompute"

    def __post_init__(self):
        if self.local_attn_frames is not None and self.local_attn_frames <= self.sink_frames:
            raise ValueError(
                f"`local_attn_frames={self.local_attn_frames}` must be larger than `sink_frames={self.sink_frames}`: "
                "the window holds the sink frames plus at least the current chunk."
            )
        if self.latents is not None and self.latents.shape[2] != len(self.frame_indices):
            raise ValueError(f"{self.latents.shape[2]} context latents but {len(self.frame_indices)} frame indices.")

    @classmethod
    def empty(
        cls, layout: CacheLayout, batch_size: int, num_frames: int, local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> RecomputeKVCache:  # fmt: skip
        """An empty cache for `batch_size` videos that will commit `num_frames` latent frames."""
        kv = KVCache.empty(layout, batch_size, 0)
        return cls(kv, max_frames=num_frames, local_attn_frames=local_attn_frames, sink_frames=sink_frames)

    @classmethod
    def from_transformer(
        cls, transformer, batch_size, num_frames, latent_height, latent_width, dtype=None, device=None,
        local_attn_frames=None, sink_frames=0,
    ) -> RecomputeKVCache:  # fmt: skip
        """As [`KVCache.from_transformer`]."""
        layout = transformer.cache_layout(latent_height, latent_width, dtype, device)
        return cls.empty(layout, batch_size, num_frames, local_attn_frames, sink_frames)

    # ------------------------------------------------------------------ properties
    @property
    def tokens_per_frame(self) -> int:
        return self.kv.tokens_per_frame

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size

    @property
    def num_layers(self) -> int:
        return self.kv.num_layers

    @property
    def end(self) -> int:
        """Committed tokens of the video."""
        return self.num_frames * self.tokens_per_frame

    @property
    def capacity_frames(self) -> int:
        return self.max_frames

    @property
    def nbytes(self) -> int:
        """Bytes of the rebuilt keys and values this cache owns, and of its context latents."""
        latents = self.latents.numel() * self.latents.element_size() if self.latents is not None else 0
        return self.kv.nbytes + latents

    # ------------------------------------------------------------------ what a pipeline calls
    def attention_cache(self, frame_offset: int) -> tuple[KVCache, int]:
        """The rebuilt keys and values and the chunk's RoPE position (the number of context frames)."""
        if frame_offset != self.num_frames:
            raise ValueError(
                f"The chunk starts at frame {frame_offset} but the cache has {self.num_frames} committed frames: a "
                "recompute cache serves the chunk right after its committed frames."
            )
        return self.kv, len(self.frame_indices)

    def context_indices(self, num_frames: int, chunk_frames: int) -> list[int]:
        """The frames the chunk after `num_frames` committed frames (of `chunk_frames` frames) attends to."""
        return window_frames(num_frames, chunk_frames, self.local_attn_frames, self.sink_frames)

    def commit(self, x0: torch.Tensor, frame_offset: int, forward: CommitForward) -> None:
        """
        Append the clean chunk `x0` `[B, C, Fc, H, W]` (starting at latent frame `frame_offset`) to the context and
        rebuild the keys and values of the next chunk's context with `forward` (see [`KVCache.commit`]).
        """
        chunk = x0.shape[2]
        if frame_offset != self.num_frames:
            raise ValueError(
                f"Commit at frame {frame_offset} but the cache has {self.num_frames} committed frames: commit chunks "
                "in order, each exactly once."
            )
        if self.num_frames + chunk > self.max_frames:
            raise ValueError(
                f"The KV cache is too short: it can commit {self.max_frames} latent frames but the chunk ends at frame "
                f"{self.num_frames + chunk}."
            )
        if self.local_attn_frames is not None and chunk > self.local_attn_frames - self.sink_frames:
            raise ValueError(
                f"A chunk of {chunk} frames does not fit the window of `local_attn_frames={self.local_attn_frames}` "
                f"with `sink_frames={self.sink_frames}`."
            )
        latents = x0.detach() if self.latents is None else torch.cat([self.latents, x0.detach()], dim=2)
        indices = self.frame_indices + list(range(frame_offset, frame_offset + chunk))
        total = frame_offset + chunk
        keep = self.context_indices(total, chunk)
        where = {f: i for i, f in enumerate(indices)}
        self.latents, self.frame_indices, self.num_frames = latents[:, :, [where[f] for f in keep]], keep, total
        self._rebuild(forward, chunk)

    def _rebuild(self, forward: CommitForward, chunk_frames: int) -> None:
        """The context's keys and values, block-causal from its first frame at positions `0..k-1`, by `forward`."""
        k = len(self.frame_indices)
        kv = KVCache(
            [b.new_zeros((self.batch_size, k * self.tokens_per_frame, *b.shape[2:])) for b in self.kv.keys],
            [b.new_zeros((self.batch_size, k * self.tokens_per_frame, *b.shape[2:])) for b in self.kv.values],
            self.tokens_per_frame,
        )
        for start in range(0, k, chunk_frames):
            forward(self.latents[:, :, start : start + chunk_frames], kv, start)
        self.kv = kv

    def recache(self, latents: torch.Tensor | None, forward: CommitForward, chunk_frames: int) -> None:
        """
        Rebuild the context's keys and values under another prompt (`forward` carries it); the context's own latents
        are used (`latents` is not needed). A commit does the same under the prompt it is given.
        """
        if self.latents is not None:
            self._rebuild(forward, chunk_frames)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """As [`KVCache.state`], with the context latents (`latents`) and their frame indices."""
        metadata, tensors = self.kv.state()
        metadata.update(
            policy=self.policy, end=self.end, num_frames=self.num_frames, max_frames=self.max_frames,
            frame_indices=self.frame_indices, local_attn_frames=self.local_attn_frames, sink_frames=self.sink_frames,
        )  # fmt: skip
        if self.latents is not None:
            tensors["latents"] = self.latents
        return metadata, tensors

    # ------------------------------------------------------------------ forking
    def _with(self, kv: KVCache, latents_fn) -> RecomputeKVCache:
        latents = latents_fn(self.latents) if self.latents is not None else None
        return replace(self, kv=kv, latents=latents, frame_indices=list(self.frame_indices))

    def fork(self, n: int, num_frames: int | None = None) -> RecomputeKVCache:
        """`n` branches per video reading the rebuilt context of this cache (not copied); see [`KVCache.fork`]."""
        max_frames = self.max_frames if num_frames is None else num_frames
        if max_frames < self.num_frames:
            raise ValueError(
                f"`num_frames={num_frames}` is shorter than the {self.num_frames} committed frames of the prefix."
            )
        forked = self._with(self.kv.fork(n, num_frames=self.kv.num_frames), lambda x: x.repeat_interleave(n, dim=0))
        forked.max_frames = max_frames
        return forked

    def materialize(self) -> RecomputeKVCache:
        return self._with(self.kv.materialize(), lambda x: x)

    def narrow(self, start: int, length: int) -> RecomputeKVCache:
        return self._with(self.kv.narrow(start, length), lambda x: x.narrow(0, start, length))
