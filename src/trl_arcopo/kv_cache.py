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
"""Self-attention key/value cache for streaming (chunk-by-chunk) generation with a causal Wan transformer."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class KVCache:
    r"""
    Per-layer self-attention keys and values of the *committed* (clean) frames of a streaming video.

    The cache is written only by a "commit" pass (the clean chunk run through the transformer at `t = 0`) and read by
    every pass that follows. Denoising passes attend to `cache[:, :start] ++ own keys` without writing, so they have
    no side effects: a cache can be shared by any number of denoising calls, forked into branches, and read under
    autograd. Stored tensors are always detached: no gradient flows into the prefix.

    Keys are stored *after* RoPE (with the absolute frame position of each token), so a read never needs positions.

    Args:
        keys (`list[torch.Tensor]`):
            One buffer per transformer block, each `[B, capacity_tokens, heads, head_dim]`.
        values (`list[torch.Tensor]`):
            Same layout as `keys`.
        tokens_per_frame (`int`):
            Tokens of one latent frame after patching (`(H / p_h) * (W / p_w)`).
        end (`int`, defaults to `0`):
            Number of committed tokens; always a multiple of `tokens_per_frame`.
        local_attn_frames (`int`, *optional*):
            If set, a chunk attends to at most this many frames (itself included): the first `sink_frames` frames
            of the video plus the most recent ones. `None` means global attention (Self-Forcing's default).
        sink_frames (`int`, defaults to `0`):
            Frames at the start of the video that stay visible under a local window (LongLive's attention sink).

    Example:

    ```py
    >>> cache = KVCache.from_transformer(pipe.transformer, batch_size=1, num_frames=21, latent_height=60, latent_width=104)
    >>> branches = cache.fork(12)  # 12 branches sharing the committed prefix; nothing is recomputed
    ```
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tokens_per_frame: int
    end: int = 0
    local_attn_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self):
        if len(self.keys) != len(self.values):
            raise ValueError(f"`keys` has {len(self.keys)} layers but `values` has {len(self.values)}.")
        if self.local_attn_frames is not None and self.local_attn_frames <= self.sink_frames:
            raise ValueError(
                f"`local_attn_frames={self.local_attn_frames}` must be larger than `sink_frames={self.sink_frames}`: "
                "the window holds the sink frames plus at least the current chunk."
            )

    # ------------------------------------------------------------------ construction
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
        Allocate an empty cache sized from `transformer.config` and the video that will be generated.

        Args:
            transformer: a Wan transformer (its `config` gives layers, heads, head dim and patch size).
            batch_size: number of videos generated together.
            num_frames: latent frames of the whole video (the cache capacity).
            latent_height, latent_width: spatial size of the latents (before patching).
            dtype, device: default to the transformer's.
        """
        config = transformer.config
        _, p_h, p_w = config.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(
                f"Latent size {latent_height}x{latent_width} is not divisible by the patch size {p_h}x{p_w}; "
                "choose a height and width that are multiples of the patch size (times the VAE's spatial factor)."
            )
        tokens_per_frame = (latent_height // p_h) * (latent_width // p_w)
        param = next(transformer.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        shape = (batch_size, num_frames * tokens_per_frame, config.num_attention_heads, config.attention_head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(keys, values, tokens_per_frame, 0, local_attn_frames, sink_frames)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity_frames(self) -> int:
        return self.keys[0].shape[1] // self.tokens_per_frame

    @property
    def num_frames(self) -> int:
        """Committed latent frames."""
        return self.end // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ------------------------------------------------------------------ checks
    def check_chunk(self, start: int, num_tokens: int, batch_size: int) -> None:
        """Raise a `ValueError` if a chunk of `num_tokens` tokens starting at token `start` cannot use this cache."""
        if num_tokens % self.tokens_per_frame:
            raise ValueError(
                f"The chunk has {num_tokens} tokens, not a multiple of the cache's {self.tokens_per_frame} tokens per "
                "frame: the cache was created for another height/width."
            )
        end_frame = (start + num_tokens) // self.tokens_per_frame
        if start + num_tokens > self.keys[0].shape[1]:
            raise ValueError(
                f"The KV cache is too short for the requested video: it holds {self.capacity_frames} latent frames "
                f"but the chunk ends at frame {end_frame}. Create it with `num_frames>={end_frame}`."
            )
        if start > self.end:
            raise ValueError(
                f"The chunk starts at frame {start // self.tokens_per_frame} but the cache has only "
                f"{self.num_frames} committed frames: commit the chunks before it first."
            )
        if batch_size != self.batch_size and self.batch_size != 1:
            raise ValueError(
                f"The input batch ({batch_size}) does not match the cache batch ({self.batch_size}); use "
                f"`cache.fork(n)` or `cache.select(indices)` to get a cache of the right batch size."
            )

    # ------------------------------------------------------------------ read / write
    def context_slices(self, start: int, num_tokens: int) -> list[slice]:
        """The token ranges a chunk `[start, start + num_tokens)` attends to in the cache (before its own tokens)."""
        if self.local_attn_frames is None:
            return [slice(0, start)] if start > 0 else []
        tpf = self.tokens_per_frame
        recent_start = max(0, start + num_tokens - (self.local_attn_frames - self.sink_frames) * tpf)
        recent_start = min(recent_start, start)
        sink_end = min(self.sink_frames * tpf, recent_start)
        slices = [s for s in (slice(0, sink_end), slice(recent_start, start)) if s.stop > s.start]
        return slices

    def read(self, layer: int, start: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, S, heads, head_dim]` that the chunk starting at token `start` attends to."""
        slices = self.context_slices(start, num_tokens)
        k, v = self.keys[layer], self.values[layer]
        if not slices:
            return k[:, :0], v[:, :0]
        if len(slices) == 1:
            return k[:, slices[0]], v[:, slices[0]]
        return torch.cat([k[:, s] for s in slices], dim=1), torch.cat([v[:, s] for s in slices], dim=1)

    def can_write_in_place(self, start: int, key: torch.Tensor) -> bool:
        """
        Whether a chunk starting at token `start` may use the in-place fast path: no autograd, the chunk right after
        the committed frames, the cache's own batch size, and global attention.
        """
        return (
            not torch.is_grad_enabled()
            and not key.requires_grad
            and start == self.end
            and key.shape[0] == self.batch_size
            and self.local_attn_frames is None
            and key.dtype == self.keys[0].dtype
        )

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor, scratch: bool = False) -> None:
        """
        Store a chunk's keys and values `[B, N, heads, head_dim]` at tokens `[start, start + N)` of one layer.
        `scratch=True` writes a not-yet-committed chunk into the free slots after `end` (they are overwritten by its
        commit and never read before it).
        """
        if start != self.end:
            raise ValueError(
                f"Commit at frame {start // self.tokens_per_frame} but the cache ends at frame {self.num_frames}: "
                "commit chunks in order, each exactly once."
            )
        if key.shape[0] != self.batch_size:
            raise ValueError(
                f"Cannot commit a batch of {key.shape[0]} into a cache of batch {self.batch_size}: fork the cache first."
            )
        n = key.shape[1]
        self.keys[layer][:, start : start + n] = key.detach()
        self.values[layer][:, start : start + n] = value.detach()

    def advance(self, num_tokens: int) -> None:
        """Mark `num_tokens` more tokens as committed (called once after every layer was written)."""
        self.end += num_tokens

    # ------------------------------------------------------------------ forking
    def _map(self, fn) -> KVCache:
        return replace(self, keys=[fn(k) for k in self.keys], values=[fn(v) for v in self.values])

    def fork(self, n: int) -> KVCache:
        """
        `n` branches per batch element sharing the committed prefix: batch `B -> B * n`, ordered
        `[b0 x n, b1 x n, ...]` (like `repeat_interleave`). The prefix is copied, not recomputed; slots after `end`
        are left empty for the branches to fill.
        """
        if n < 1:
            raise ValueError(f"`n={n}` must be at least 1.")

        def fork_buffer(buf: torch.Tensor) -> torch.Tensor:
            out = buf.new_zeros((buf.shape[0] * n, *buf.shape[1:]))
            out[:, : self.end] = buf[:, : self.end].repeat_interleave(n, dim=0)
            return out

        return self._map(fork_buffer)

    def select(self, indices: torch.Tensor | list[int]) -> KVCache:
        """Keep the batch rows `indices` (in that order; repeats allowed)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.keys[0].device)
        return self._map(lambda buf: buf.index_select(0, index))

    def clone(self) -> KVCache:
        return self._map(lambda buf: buf.clone())

    def detach(self) -> KVCache:
        return self._map(lambda buf: buf.detach())

    def to(self, device=None, dtype=None) -> KVCache:
        return self._map(lambda buf: buf.to(device=device, dtype=dtype))
