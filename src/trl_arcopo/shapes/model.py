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
The Moving Shapes generator's own pieces: its transformer (the causal Wan with an `x̂0` head), the teacher-forcing
mask it is pretrained with, and its in-memory tokenizer and text encoder.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin  # noqa: F401  (diffusers finds a custom component's loader through it)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from transformers import T5Tokenizer, UMT5EncoderModel

from ..models.causal_wan import CausalWanTransformer3DModel, block_causal_mask
from ..text_encoders import small_umt5_encoder, word_tokenizer
from .world import vocabulary


def shapes_tokenizer() -> T5Tokenizer:
    """The world's tokenizer: a T5 tokenizer over the words of its prompts, built in memory."""
    return word_tokenizer(vocabulary())


def shapes_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    """The world's text encoder, untrained: a 2-layer UMT5 (d_model 64) over [`shapes_tokenizer`]'s vocabulary."""
    vocab_size = len(shapes_tokenizer().get_vocab())
    return small_umt5_encoder(d_model=64, vocab_size=vocab_size, seed=seed, d_kv=16, d_ff=128)


def teacher_forcing_mask(
    num_frames: int, num_frames_per_chunk: int, tokens_per_frame: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """
    Boolean mask `[2N, 2N]` for a sequence `[noisy frames ; clean frames]` (each `N` tokens): noisy chunk `c` attends
    to the clean chunks before it and to itself; clean chunk `c` attends to the clean chunks up to itself. One forward
    then gives, for every chunk, the prediction streaming would make for it with a cache of the clean chunks before.
    Use it with `frame_indices = cat([arange(F), arange(F)])` so both copies share RoPE positions.
    """
    causal = block_causal_mask(num_frames, num_frames_per_chunk, tokens_per_frame, device)  # [N, N]
    chunk = (torch.arange(num_frames, device=device) // num_frames_per_chunk).repeat_interleave(tokens_per_frame)
    same_chunk = chunk[:, None] == chunk[None, :]  # [N, N]
    strictly_before = chunk[:, None] > chunk[None, :]  # [N, N]
    top = torch.cat([same_chunk, strictly_before], dim=1)  # noisy queries: [N, 2N]
    bottom = torch.cat([torch.zeros_like(causal), causal], dim=1)  # clean queries: [N, 2N]
    return torch.cat([top, bottom], dim=0)  # [2N, 2N]


class CausalWanX0Transformer3DModel(CausalWanTransformer3DModel):
    r"""
    [`CausalWanTransformer3DModel`] whose output head predicts the clean sample `x̂0` instead of the flow velocity;
    `forward` converts it to the velocity every caller expects, `v = (x_t - x̂0) / σ` with `σ = timestep / 1000` per
    frame, so pipelines, samplers and trainers use it unchanged (and `x_t - σ·v` gives back `x̂0`).

    Same parameters and checkpoint layout as Wan. It is meant for small models trained from scratch in pixel space
    (the Moving Shapes generator): predicting the velocity `ε - x0` there means copying the input noise through the
    network, which a tiny transformer does imprecisely, and the error shows up as speckle in every `x̂0`. Predicting
    `x0` needs no such copy. At `timestep = 0` (the cache-commit pass, whose output is not used) `σ` is clamped to
    `1e-3`.
    """

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        x0 = super().forward(hidden_states, timestep, *args, return_dict=False, **kwargs)[0]  # [B, C, F, H, W]
        batch_size, _, num_frames = hidden_states.shape[:3]
        sigma = timestep.float().expand(batch_size) if timestep.ndim == 0 else timestep.float()
        sigma = sigma.reshape(batch_size, -1).expand(batch_size, num_frames) / 1000  # [B, F]
        sigma = sigma.clamp_min(1e-3)[:, None, :, None, None].to(x0.dtype)  # [B, 1, F, 1, 1]
        velocity = (hidden_states - x0) / sigma  # [B, C, F, H, W]
        if not return_dict:
            return (velocity,)
        return Transformer2DModelOutput(sample=velocity)
