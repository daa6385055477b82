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
"""The full KV cache of a streaming generator: every committed frame's keys and values, forks that share a prefix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..attention_window import window_frames


#: `forward(x, cache, frame_offset)`: runs the clean chunk `x` at `t = 0` through the transformer with
#: `update_cache=True`, writing its keys and values into `cache` (a pipeline's commit pass).
CommitForward = Callable[[torch.Tensor, "KVCache", int], None]


@dataclass(frozen=True)
class CacheLayout:
    r"""
    The shape of a transformer's self-attention keys and values: what a cache is allocated from, whatever the model.
    A transformer gives its own with a `cache_layout(latent_height, latent_width, dtype=None, device=None)` method
    ([`~trl_arcopo.CausalWanTransformer3DModel.cache_layout`]).

    Args:
        num_layers (`int`): attention layers (one key and one value buffer each).
        num_heads (`int`), head_dim (`int`): the keys' last two dimensions.
        tokens_per_frame (`int`): tokens of one latent frame.
        dtype (`torch.dtype`), device (`torch.device`): of the buffers.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    tokens_per_frame: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def buffers(self, batch_size: int, num_frames: int) -> list[torch.Tensor]:
        """One zero buffer `[batch_size, num_frames * tokens_per_frame, heads, head_dim]` per layer."""
        shape = (batch_size, num_frames * self.tokens_per_frame, self.num_heads, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]


@dataclass
class KVCache:
    r"""
    Per-layer self-attention keys and values of the *committed* (clean) frames of a streaming video.

    The cache is written only by a "commit" pass (the clean chunk run through the transformer at `t = 0`) and read by
    every pass that follows. Denoising passes attend to the committed frames and their own keys without writing, so
    they have no side effects: a cache can be shared by any number of denoising calls, forked into branches, and read
    under autograd. Stored tensors are always detached: no gradient flows into the prefix.

    Keys are stored *after* RoPE (with the absolute frame position of each token), so a read never needs positions.

    **Forks share their prefix.** [`~KVCache.fork`] gives `n` branches per video that read the committed frames of
    this cache (the *prefix*, batch `B`, never copied) and own storage only for the frames they commit after it
    (batch `B * n`). A cache holds the frames that will be *committed*: a video's last chunk is never committed (no
    later chunk reads it), so a video of `L` chunks needs `L - 1` chunks of capacity.

    Args:
        keys (`list[torch.Tensor]`):
            One buffer per transformer block, each `[B, capacity_tokens, heads, head_dim]`: the tokens
            `[offset, offset + capacity_tokens)` of the video.
        values (`list[torch.Tensor]`):
            Same layout as `keys`.
        tokens_per_frame (`int`):
            Tokens of one latent frame after patching (`(H / p_h) * (W / p_w)`).
        end (`int`, defaults to `0`):
            Number of committed tokens of the video (the prefix's included); a multiple of `tokens_per_frame`.
        local_attn_frames (`int`, *optional*):
            If set, a chunk attends to at most this many frames (itself included): the first `sink_frames` frames
            of the video plus the most recent ones. `None` means global attention (Self-Forcing's default).
        sink_frames (`int`, defaults to `0`):
            Frames at the start of the video that stay visible under a local window (LongLive's attention sink).
        prefix ([`KVCache`], *optional*):
            The shared cache of the tokens before `offset` (batch `B / g`: row `i` of this cache reads row `i // g`
            of the prefix, the order of `repeat_interleave`). Read only.
        offset (`int`, defaults to `0`):
            Tokens held by `prefix`, the first token of this cache's own storage.
        floor (`int`, defaults to `0`):
            Tokens between the sink frames and `floor` are not read: a re-cache ([`~KVCache.recache`]) re-encodes
            only the sink and the recent frames, from `floor` on.

    Example:

    ```py
    >>> cache = KVCache.from_transformer(pipe.transformer, batch_size=1, num_frames=18, latent_height=60, latent_width=104)
    >>> branches = cache.fork(12)  # 12 branches reading the committed prefix; nothing is copied or recomputed
    ```
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tokens_per_frame: int
    end: int = 0
    local_attn_frames: int | None = None
    sink_frames: int = 0
    prefix: KVCache | None = None
    offset: int = 0
    floor: int = 0

    #: The cache policy this class implements (a generator config's `cache_policy`).
    policy = "full"

    def __post_init__(self):
        if len(self.keys) != len(self.values):
            raise ValueError(f"`keys` has {len(self.keys)} layers but `values` has {len(self.values)}.")
        if self.local_attn_frames is not None and self.local_attn_frames <= self.sink_frames:
            raise ValueError(
                f"`local_attn_frames={self.local_attn_frames}` must be larger than `sink_frames={self.sink_frames}`: "
                "the window holds the sink frames plus at least the current chunk."
            )
        if self.prefix is None and self.offset:
            raise ValueError(f"`offset={self.offset}`: a cache reads the tokens before its offset from a `prefix`.")
        if self.prefix is not None:
            if self.offset > self.prefix.end:
                raise ValueError(f"`offset={self.offset}` but the prefix has only {self.prefix.end} committed tokens.")
            if self.batch_size % self.prefix.batch_size:
                raise ValueError(
                    f"A cache of batch {self.batch_size} cannot read a prefix of batch {self.prefix.batch_size}: "
                    "the batch must be a multiple of the prefix's (use `prefix.fork(n)`)."
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(
        cls, layout: CacheLayout, batch_size: int, num_frames: int, local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> KVCache:  # fmt: skip
        """An empty cache of `layout` for `batch_size` videos that will commit `num_frames` latent frames."""
        keys, values = layout.buffers(batch_size, num_frames), layout.buffers(batch_size, num_frames)
        return cls(keys, values, layout.tokens_per_frame, 0, local_attn_frames, sink_frames)

    @classmethod
    def from_transformer(
        cls,
        transformer: torch.nn.Module,
        batch_size: int,
        num_frames: int,
        latent_height: int,
        latent_width: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> KVCache:
        """
        Allocate an empty cache sized from `transformer.cache_layout(latent_height, latent_width, dtype, device)` and
        the frames that will be committed.

        Args:
            transformer: a transformer with a `cache_layout` method (e.g. [`CausalWanTransformer3DModel`]).
            batch_size: number of videos generated together.
            num_frames: latent frames that will be committed (the capacity): the video's frames less its last chunk.
            latent_height, latent_width: spatial size of the latents (before patching).
            dtype, device: default to the transformer's.
        """
        layout = transformer.cache_layout(latent_height, latent_width, dtype, device)
        return cls.empty(layout, batch_size, num_frames, local_attn_frames, sink_frames)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_frames(self) -> int:
        """Committed latent frames (the prefix's included)."""
        return self.end // self.tokens_per_frame

    @property
    def capacity_tokens(self) -> int:
        """The video's tokens up to which this cache can commit (its prefix's included)."""
        return self.offset + self.keys[0].shape[1]

    @property
    def capacity_frames(self) -> int:
        """The latent frames up to which this cache can commit (its prefix's included)."""
        return self.capacity_tokens // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        """Bytes of this cache's own storage (a fork's prefix is counted by the prefix)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ checks
    def check_chunk(self, start: int, num_tokens: int, batch_size: int, commit: bool = False) -> None:
        """
        Raise a `ValueError` if a chunk of `num_tokens` tokens starting at token `start` cannot use this cache
        (`commit=True`: to be written into it).
        """
        if num_tokens % self.tokens_per_frame:
            raise ValueError(
                f"The chunk has {num_tokens} tokens, not a multiple of the cache's {self.tokens_per_frame} tokens per "
                "frame: the cache was created for another height/width."
            )
        end_frame = (start + num_tokens) // self.tokens_per_frame
        if commit and start + num_tokens > self.capacity_tokens:
            raise ValueError(
                f"The KV cache is too short for the requested video: it can commit {self.capacity_frames} latent "
                f"frames but the chunk ends at frame {end_frame}. Create it with `num_frames>={end_frame}` (the "
                "video's frames less its last chunk, which is never committed)."
            )
        if start > self.end:
            raise ValueError(
                f"The chunk starts at frame {start // self.tokens_per_frame} but the cache has only "
                f"{self.num_frames} committed frames: commit the chunks before it first."
            )
        if start < self.offset:
            raise ValueError(
                f"The chunk starts at frame {start // self.tokens_per_frame}, inside the shared prefix of this fork "
                f"({self.offset // self.tokens_per_frame} frames); a fork continues after its prefix."
            )
        if batch_size != self.batch_size and self.batch_size != 1:
            raise ValueError(
                f"The input batch ({batch_size}) does not match the cache batch ({self.batch_size}); use "
                f"`cache.fork(n)` or `cache.narrow(start, length)` to get a cache of the right batch size."
            )

    # ------------------------------------------------------------------ read / write
    def context_slices(self, start: int, num_tokens: int) -> list[slice]:
        """The token ranges a chunk `[start, start + num_tokens)` attends to in the cache (before its own tokens)."""
        if self.local_attn_frames is None:
            return [slice(0, start)] if start > 0 else []
        tpf = self.tokens_per_frame
        recent_start = max(0, start + num_tokens - (self.local_attn_frames - self.sink_frames) * tpf, self.floor)
        recent_start = min(recent_start, start)
        sink_end = min(self.sink_frames * tpf, recent_start)
        slices = [s for s in (slice(0, sink_end), slice(recent_start, start)) if s.stop > s.start]
        return slices

    def _pieces(self, layer: int, tokens: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values `[B_i, S_i, heads, head_dim]` of the video's `tokens` (a prefix's at its own batch)."""
        pieces = []
        if self.prefix is not None and tokens.start < self.offset:
            pieces += self.prefix._pieces(layer, slice(tokens.start, min(tokens.stop, self.offset)))
        if tokens.stop > self.offset:
            pieces += self._own_pieces(layer, max(tokens.start, self.offset), tokens.stop)
        return pieces

    def _own_pieces(self, layer: int, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The video's tokens `[start, stop)` (all at or after `offset`) in this cache's own storage, as views."""
        own = slice(start - self.offset, stop - self.offset)
        return [(self.keys[layer][:, own], self.values[layer][:, own])]

    def _store(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copy a chunk's keys and values (detached) to the video's tokens `[start, start + N)` of one layer."""
        local = start - self.offset
        self.keys[layer][:, local : local + key.shape[1]] = key.detach()
        self.values[layer][:, local : local + key.shape[1]] = value.detach()

    def _gather(
        self, layer: int, slices: list[slice], key: torch.Tensor | None = None, value: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The cached tokens `slices` (each cached row broadcast to the rows that read it), then `key` / `value` (none:
        the cache's batch and dtype).
        """
        if key is None:
            key = value = self.keys[layer].new_empty((self.batch_size, 0, *self.keys[layer].shape[2:]))
        pieces = [p for s in slices for p in self._pieces(layer, s)]
        batch, n = key.shape[0], key.shape[1]
        context = sum(k.shape[1] for k, _ in pieces)
        out_k = key.new_empty((batch, context + n, *key.shape[2:]))
        out_v = value.new_empty((batch, context + n, *value.shape[2:]))
        position = 0
        for k, v in pieces:
            rows, size = k.shape[0], k.shape[1]
            if batch % rows:
                raise ValueError(f"A batch of {batch} cannot read cached keys of batch {rows}.")
            # [rows, batch / rows, S_i, heads, head_dim]: each cached row broadcast to the branches that read it
            out_k.view(rows, batch // rows, *out_k.shape[1:])[:, :, position : position + size] = k[:, None]
            out_v.view(rows, batch // rows, *out_v.shape[1:])[:, :, position : position + size] = v[:, None]
            position += size
        out_k[:, context:], out_v[:, context:] = key, value  # under autograd, the gradient flows to `key` and `value`
        return out_k, out_v

    def attended(
        self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor, commit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The keys and values `[B, S + N, heads, head_dim]` a chunk starting at token `start` attends to: the cached
        context, then its own `key` and `value` `[B, N, heads, head_dim]` (which carry the gradient, if any); with
        `commit=True` the chunk's keys and values are also written (the commit pass). The context of a fork is read
        from its prefix at the prefix's batch and broadcast to the branches, in the same order as a full cache.

        Fast path (plain streaming without autograd): a cache without a prefix writes the chunk into the free slots
        right after the committed frames (scratch until a commit makes them permanent; never read before) and returns
        one slice of its buffer, without copying the context.
        """
        n = key.shape[1]
        local = start - self.offset
        if (
            self.prefix is None
            and self.local_attn_frames is None
            and start == self.end
            and local + n <= self.keys[layer].shape[1]
            and key.shape[0] == self.batch_size
            and key.dtype == self.keys[layer].dtype
            and not torch.is_grad_enabled()
            and not key.requires_grad
        ):
            self.keys[layer][:, local : local + n] = key
            self.values[layer][:, local : local + n] = value
            return self.keys[layer][:, : local + n], self.values[layer][:, : local + n]

        out = self._gather(layer, self.context_slices(start, n), key, value)
        if commit:  # after the read: a ring may reuse the slots of frames the chunk still attends to
            self.write(layer, start, key, value)
        return out

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store a chunk's keys and values `[B, N, heads, head_dim]` at tokens `[start, start + N)` of one layer."""
        if start != self.end:
            raise ValueError(
                f"Commit at frame {start // self.tokens_per_frame} but the cache ends at frame {self.num_frames}: "
                "commit chunks in order, each exactly once."
            )
        if key.shape[0] != self.batch_size:
            raise ValueError(
                f"Cannot commit a batch of {key.shape[0]} into a cache of batch {self.batch_size}: fork the cache first."
            )
        if start + key.shape[1] > self.capacity_tokens:
            raise ValueError(
                f"The KV cache is too short: it can commit {self.capacity_frames} latent frames but the chunk ends "
                f"at frame {(start + key.shape[1]) // self.tokens_per_frame}."
            )
        self._store(layer, start, key, value)

    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` more tokens as committed (called once after every layer was written)."""
        self.end += num_tokens

    # ------------------------------------------------------------------ what a pipeline calls
    def attention_cache(self, frame_offset: int) -> tuple[KVCache, int]:
        """
        The cache a transformer forward of the chunk starting at latent frame `frame_offset` reads (and a commit
        writes), and the chunk's RoPE frame position: this cache and `frame_offset` (absolute positions).
        """
        return self, frame_offset

    def commit(self, x0: torch.Tensor, frame_offset: int, forward: CommitForward) -> None:
        """
        Commit the clean chunk `x0` `[B, C, Fc, H, W]` starting at latent frame `frame_offset`: `forward(x0, self,
        frame_offset)` runs it at `t = 0` with `update_cache=True`, which writes its keys and values.
        """
        forward(x0, self, frame_offset)

    def recache(self, latents: torch.Tensor, forward: CommitForward, chunk_frames: int) -> None:
        """
        Re-encode what the next chunk reads under another prompt (LongLive's re-cache after a prompt switch): the sink
        frames and the recent frames of the window, from their clean `latents` `[B, C, F, H, W]` (every committed
        frame of the video), each block of `chunk_frames` frames committed again by `forward` (which carries the new
        prompt) at its position, the sink first, then the recent frames; frames in between are no longer read. Without
        a window, every committed frame is re-encoded. The cache must not be a fork (`materialize()` it first).
        """
        if self.prefix is not None:
            raise ValueError(
                "A fork reads its prefix, which a re-cache cannot change: `materialize()` the fork first."
            )
        end = self.num_frames
        if latents.shape[2] != end:
            raise ValueError(
                f"A re-cache needs the clean latents of the {end} committed frames, got {latents.shape[2]}."
            )
        keep = window_frames(end, chunk_frames, self.local_attn_frames, self.sink_frames)
        for buffer in self.keys + self.values:
            buffer.zero_()
        self.end = self.floor = 0
        sink = [f for f in keep if f < self.sink_frames] if self.local_attn_frames is not None else keep
        recent = [f for f in keep if f not in sink]
        for frames in (sink, recent):
            if not frames:
                continue
            if frames[0] * self.tokens_per_frame > self.end:  # skip to the recent frames: nothing between is read
                self.end = self.floor = frames[0] * self.tokens_per_frame
            for start in range(frames[0], frames[-1] + 1, chunk_frames):
                stop = min(start + chunk_frames, frames[-1] + 1)
                forward(latents[:, :, start:stop], self, start)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """
        `(metadata, tensors)` that [`cache_from_state`] turns back into this cache (a fork is materialized first):
        JSON-able settings and the tensors, named `keys.{layer}` / `values.{layer}`.
        """
        cache = self.materialize()
        tensors = {f"keys.{i}": k for i, k in enumerate(cache.keys)} | {
            f"values.{i}": v for i, v in enumerate(cache.values)
        }
        metadata = {
            "policy": self.policy,
            "num_layers": cache.num_layers,
            "tokens_per_frame": cache.tokens_per_frame,
            "end": cache.end,
            "local_attn_frames": cache.local_attn_frames,
            "sink_frames": cache.sink_frames,
            "floor": cache.floor,
        }
        return metadata, tensors

    # ------------------------------------------------------------------ forking
    def _map(self, fn) -> KVCache:
        return replace(self, keys=[fn(k) for k in self.keys], values=[fn(v) for v in self.values])

    def _own_tokens(self, capacity: int, end: int) -> int:
        """Tokens of own storage a cache needs to commit the video's tokens `[end, capacity)`."""
        return capacity - end

    def fork(self, n: int, num_frames: int | None = None) -> KVCache:
        """
        `n` branches per batch element reading this cache's committed frames as their shared prefix: batch
        `B -> B * n`, ordered `[b0 x n, b1 x n, ...]` (like `repeat_interleave`). Nothing is copied or recomputed;
        the branches own storage only for the frames they commit after the prefix, up to `num_frames` latent frames
        of the video (default: this cache's capacity). Keep this cache unchanged while its forks are in use.
        """
        if n < 1:
            raise ValueError(f"`n={n}` must be at least 1.")
        capacity = self.capacity_tokens if num_frames is None else num_frames * self.tokens_per_frame
        if capacity < self.end:
            raise ValueError(
                f"`num_frames={num_frames}` is shorter than the {self.num_frames} committed frames of the prefix."
            )

        tokens = self._own_tokens(capacity, self.end)

        def own(buf: torch.Tensor) -> torch.Tensor:
            return buf.new_zeros((buf.shape[0] * n, tokens, *buf.shape[2:]))

        return replace(self._map(own), prefix=self, offset=self.end, **self._fork_fields(capacity))

    def _fork_fields(self, capacity: int) -> dict:
        """Fields a fork of the given capacity (tokens of the video) sets beyond its storage and prefix."""
        return {}

    def materialize(self) -> KVCache:
        """The same cache with every committed frame in its own storage (a fork's prefix copied to each branch)."""
        if self.prefix is None:
            return self
        keys, values = [], []
        for layer in range(self.num_layers):
            k, v = self._gather(layer, [slice(0, self.offset)] if self.offset else [])  # every prefix frame
            keys.append(torch.cat([k, self.keys[layer]], dim=1))
            values.append(torch.cat([v, self.values[layer]], dim=1))
        return replace(self, keys=keys, values=values, prefix=None, offset=0)

    def narrow(self, start: int, length: int) -> KVCache:
        """The batch rows `[start, start + length)`, as views (nothing is copied); a fork is materialized first."""
        return self.materialize()._map(lambda buf: buf.narrow(0, start, length))
