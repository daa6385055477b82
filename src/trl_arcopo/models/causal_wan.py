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
"""Self-Forcing's causal Wan2.1 transformer on top of diffusers' `WanTransformer3DModel` weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401  (diffusers finds a custom component's

# loader by looking up `ModelMixin` in the component's module when a pipeline is loaded)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

from ..kv_cache import CacheLayout, KVCache


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, N, heads, head_dim]; cos, sin: [1, N, 1, head_dim] (interleaved pairs, as in diffusers' Wan)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, heads, head_dim / 2] each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def block_causal_mask(
    num_frames: int, num_frames_per_chunk: int, tokens_per_frame: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """
    Boolean attention mask `[N, N]` (`True` = may attend) for one full-sequence forward that is equivalent to
    streaming: bidirectional inside a chunk, causal across chunks.
    """
    if num_frames % num_frames_per_chunk:
        raise ValueError(
            f"`num_frames={num_frames}` is not a multiple of `num_frames_per_chunk={num_frames_per_chunk}`."
        )
    chunk = torch.arange(num_frames, device=device) // num_frames_per_chunk  # [F]
    chunk = chunk.repeat_interleave(tokens_per_frame)  # [N]
    return chunk[:, None] >= chunk[None, :]  # [N, N]


class CausalWanTransformer3DModel(WanTransformer3DModel):
    r"""
    The causal Wan2.1 transformer of Self-Forcing, with diffusers' `WanTransformer3DModel` parameters unchanged.

    It differs from the stock model only in its forward:

    - **per-frame timesteps**: `timestep` may be `[B]` or `[B, F]`; the adaLN modulation (blocks and output head) is
      computed once per latent frame and broadcast to that frame's tokens;
    - **RoPE frame offset**: token positions start at `frame_offset` (or follow `frame_indices`), so a chunk gets the
      positions it has in the whole video;
    - **external KV cache**: with `kv_cache`, self-attention reads the committed keys/values of earlier chunks
      (causal across chunks, bidirectional inside the chunk); with `update_cache=True` the chunk's own keys/values are
      written (the clean "context" pass that commits a chunk);
    - **attention mask**: without a cache, an optional boolean `attention_mask` (`[N, N]`, e.g. from
      [`block_causal_mask`]) gives the equivalent full-sequence (teacher-forced) forward.

    Any Wan2.1 transformer folder loads with `from_pretrained`, Wan LoRAs in diffusers format apply, and
    [`~CausalWanTransformer3DModel.from_wan`] makes an existing `WanTransformer3DModel` causal without copying it.
    Image conditioning (Wan I2V) is not supported.
    """

    @classmethod
    def from_wan(cls, transformer: WanTransformer3DModel) -> CausalWanTransformer3DModel:
        """
        A causal view of a stock `WanTransformer3DModel`: the returned model shares every submodule and parameter with
        `transformer` (nothing is copied; a LoRA added to one is seen by the other).
        """
        if isinstance(transformer, cls):
            return transformer
        if not isinstance(transformer, WanTransformer3DModel):
            raise TypeError(
                f"Expected a `WanTransformer3DModel`, got {type(transformer).__name__}. Load a Wan2.1 transformer "
                "(or a converted Self-Forcing checkpoint, see `trl_arcopo.convert`)."
            )
        with torch.device("meta"):
            model = cls.from_config(transformer.config)
        for name, child in transformer.named_children():
            setattr(model, name, child)
        for name, param in transformer.named_parameters(recurse=False):
            setattr(model, name, param)
        for attr in ("_hf_peft_config_loaded", "peft_config", "gradient_checkpointing", "_name_or_path"):
            if attr in transformer.__dict__:
                setattr(model, attr, transformer.__dict__[attr])
        model.train(transformer.training)
        return model

    _sub_batch: tuple[int, int] | None = None  # set by `sub_batch`

    @contextmanager
    def sub_batch(self, offset: int, total: int):
        """
        Calls in this context compute rows `[offset, offset + B)` of a batch of `total` videos (which share their
        timesteps). The two embeddings whose rounding depends on the batch size (the patch embedding's convolution
        and the timestep MLP: their kernels are chosen by their number of rows) are computed at the whole batch's
        size, so a batch computed in sub-batches gives the same bits as one call; every other operation rounds a row
        the same way whatever the batch. The whole batch costs one patch embedding per call, a small part of one.
        """
        if not 0 <= offset < total:
            raise ValueError(f"`offset={offset}` must be a row of the batch of `total={total}` videos.")
        previous, self._sub_batch = self._sub_batch, (offset, total)
        try:
            yield
        finally:
            self._sub_batch = previous

    def _embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding `[B, C, F, H, W] -> [B, N, D]` (tokens in frame, row, column order)."""
        rows, batch = self._sub_batch, x.shape[0]
        if rows is not None:  # computed at the whole batch's size (see `sub_batch`); the other rows are zeros
            whole = x.new_zeros((rows[1], *x.shape[1:]))
            whole[rows[0] : rows[0] + batch] = x
            x = whole
        out = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # [B or total, N, D]
        return out if rows is None else out[rows[0] : rows[0] + batch].clone()  # (frees the whole batch's rows)

    # ------------------------------------------------------------------ helpers
    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, p_h, p_w = self.config.patch_size
        return (latent_height // p_h) * (latent_width // p_w)

    def cache_layout(
        self,
        latent_height: int,
        latent_width: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> CacheLayout:
        """The layout of this model's keys and values for latents of the given size (dtype and device: the model's)."""
        _, p_h, p_w = self.config.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(
                f"Latent size {latent_height}x{latent_width} is not divisible by the patch size {p_h}x{p_w}; "
                "choose a height and width that are multiples of the patch size (times the VAE's spatial factor)."
            )
        param = next(self.parameters())
        return CacheLayout(
            num_layers=self.config.num_layers,
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            tokens_per_frame=self.tokens_per_frame(latent_height, latent_width),
            dtype=dtype or param.dtype,
            device=device or param.device,
        )

    def _rotary_embedding(self, frame_indices: torch.Tensor, pph: int, ppw: int) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rope
        if int(frame_indices.max()) >= rope.max_seq_len or max(pph, ppw) > rope.max_seq_len:
            raise ValueError(
                f"Frame position {int(frame_indices.max())} (or a spatial size {pph}x{ppw}) exceeds the RoPE table of "
                f"{rope.max_seq_len} positions (`rope_max_seq_len` in the transformer config); use a shorter video "
                "or a local attention window."
            )
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            f_t, f_h, f_w = table.split(split, dim=1)
            ppf = frame_indices.shape[0]
            f_t = f_t[frame_indices.to(f_t.device)].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1)
            f_h = f_h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1)
            f_w = f_w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)
            out.append(torch.cat([f_t, f_h, f_w], dim=-1).reshape(1, ppf * pph * ppw, 1, -1))  # [1, N, 1, head_dim]
        return out[0], out[1]

    @staticmethod
    def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: [B, N, D] (fp32); scale, shift: [B, F, D] -> per-frame broadcast over each frame's tokens
        b, n, d = x.shape
        x = x.view(b, num_frames, n // num_frames, d)  # [B, F, tokens_per_frame, D]
        return (x * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d)

    @staticmethod
    def _gate(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x + update * gate with a per-frame gate [B, F, D]; computed in fp32 and cast back, like diffusers' Wan
        b, n, d = x.shape
        out = (
            x.float().view(b, num_frames, n // num_frames, d)
            + update.float().view(b, num_frames, n // num_frames, d) * gate[:, :, None]
        )
        return out.view(b, n, d).type_as(x)

    def _self_attention(
        self,
        layer: int,
        attn: torch.nn.Module,
        x: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache | None,
        start: int,
        update_cache: bool,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))  # [B, N, heads, head_dim]
        key = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))  # [B, N, heads, head_dim]
        value = attn.to_v(x).unflatten(2, (attn.heads, -1))  # [B, N, heads, head_dim]
        query = _apply_rotary(query, *rotary_emb)
        key = _apply_rotary(key, *rotary_emb)

        if kv_cache is not None:  # the cached context, then this chunk (written to the cache by a commit pass)
            key, value = kv_cache.attended(layer, start, key, value, commit=update_cache)

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attention_mask
        )  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)  # [B, N, D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _block(
        self,
        layer: int,
        block: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_proj: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        num_frames: int,
        kv_cache: KVCache | None,
        start: int,
        update_cache: bool,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # timestep_proj: [B, F, 6, D]
        modulation = block.scale_shift_table.unsqueeze(0) + timestep_proj.float()  # [B, F, 6, D]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = modulation.unbind(2)  # [B, F, D]

        # 1. Self-attention (block-causal through the cache or the mask)
        norm_hidden_states = self._modulate(block.norm1(hidden_states.float()), scale_msa, shift_msa, num_frames)
        attn_output = self._self_attention(
            layer,
            block.attn1,
            norm_hidden_states.type_as(hidden_states),
            rotary_emb,
            kv_cache,
            start,
            update_cache,
            attention_mask,
        )
        hidden_states = self._gate(hidden_states, attn_output, gate_msa, num_frames)

        # 2. Cross-attention (text; the stock processor)
        norm_hidden_states = block.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + block.attn2(norm_hidden_states, encoder_hidden_states, None, None)

        # 3. Feed-forward
        norm_hidden_states = self._modulate(block.norm3(hidden_states.float()), c_scale_msa, c_shift_msa, num_frames)
        ff_output = block.ffn(norm_hidden_states.type_as(hidden_states))
        return self._gate(hidden_states, ff_output, c_gate_msa, num_frames)

    # ------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        kv_cache: KVCache | None = None,
        frame_offset: int = 0,
        update_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        frame_indices: torch.Tensor | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, num_frames, height, width)`):
                The chunk (with a cache) or the whole sequence (without).
            timestep (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, num_frames)`):
                Flow-matching timesteps in `[0, 1000]`, one per video or one per latent frame.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_len, text_dim)`):
                Prompt embeddings.
            kv_cache ([`KVCache`], *optional*):
                Committed keys/values of the frames before `frame_offset`.
            frame_offset (`int`, defaults to `0`):
                Index of the first latent frame of `hidden_states` in the video (RoPE position and cache slot).
            update_cache (`bool`, defaults to `False`):
                Write this chunk's keys/values into `kv_cache` (the clean context pass that commits the chunk).
            attention_mask (`torch.Tensor` of shape `(N, N)`, *optional*):
                Boolean self-attention mask for a full-sequence forward (`True` = attend). Not used with a cache.
            frame_indices (`torch.Tensor` of shape `(num_frames,)`, *optional*):
                Explicit RoPE frame positions (e.g. for a teacher-forcing sequence). Defaults to
                `frame_offset + arange(num_frames)`.
        """
        if encoder_hidden_states_image is not None:
            raise ValueError("Image conditioning (Wan I2V) is not supported by the causal transformer.")
        if kv_cache is not None and attention_mask is not None:
            raise ValueError("Pass either `kv_cache` (streaming) or `attention_mask` (full sequence), not both.")
        if update_cache and kv_cache is None:
            raise ValueError("`update_cache=True` needs a `kv_cache` to write to.")

        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if p_t != 1:
            raise ValueError(f"The causal transformer needs a temporal patch size of 1, got {p_t}.")
        if height % p_h or width % p_w:
            raise ValueError(f"Latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}.")
        pph, ppw = height // p_h, width // p_w
        num_tokens = num_frames * pph * ppw

        if frame_indices is None:
            frame_indices = torch.arange(frame_offset, frame_offset + num_frames)
        start = frame_offset * pph * ppw
        if kv_cache is not None:
            kv_cache.check_chunk(start, num_tokens, batch_size, commit=update_cache)
        if attention_mask is not None and attention_mask.shape != (num_tokens, num_tokens):
            raise ValueError(
                f"`attention_mask` must be [{num_tokens}, {num_tokens}], got {list(attention_mask.shape)}."
            )

        rotary_emb = self._rotary_embedding(frame_indices, pph, ppw)  # 2 x [1, N, 1, head_dim]

        # Per-frame timesteps [B, F]
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(batch_size, num_frames)
        if timestep.shape != (batch_size, num_frames):
            raise ValueError(
                f"`timestep` must be [B] or [B, F] = [{batch_size}, {num_frames}], got {list(timestep.shape)}."
            )
        rows = self._sub_batch
        if rows is not None and rows[0] + batch_size > rows[1]:
            raise ValueError(
                f"A batch of {batch_size} videos is not rows {rows[0]}.. of a batch of {rows[1]} (`sub_batch`)."
            )
        if rows is not None:  # the timesteps of the whole batch (a call's videos share their timesteps)
            whole = timestep[:1].expand(rows[1], -1).clone()
            whole[rows[0] : rows[0] + batch_size] = timestep
            timestep = whole  # [total, F]
        hidden_states = self._embed_patches(hidden_states)  # [B, N, D]
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=num_frames
        )  # temb: [B, F, D]; timestep_proj: [B, F, 6 * D]
        if rows is not None:
            temb, timestep_proj = temb[rows[0] : rows[0] + batch_size], timestep_proj[rows[0] : rows[0] + batch_size]
        timestep_proj = timestep_proj.unflatten(2, (6, -1))  # [B, F, 6, D]

        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden_states.device)
        for layer, block in enumerate(self.blocks):
            args = (
                layer,
                block,
                hidden_states,
                encoder_hidden_states,
                timestep_proj,
                rotary_emb,
                num_frames,
                kv_cache,
                start,
                update_cache,
                attention_mask,
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing and not update_cache:
                hidden_states = self._gradient_checkpointing_func(self._block, *args)
            else:
                hidden_states = self._block(*args)
        if update_cache:
            kv_cache.advance(num_tokens)

        # Output norm, per-frame modulation, projection and unpatchify
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # [B, F, D] each
        hidden_states = self._modulate(self.norm_out(hidden_states.float()), scale, shift, num_frames)
        hidden_states = self.proj_out(hidden_states.type_as(encoder_hidden_states))  # [B, N, C * p_t * p_h * p_w]
        hidden_states = hidden_states.reshape(batch_size, num_frames, pph, ppw, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, p_t, pph, p_h, ppw, p_w]
        output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
