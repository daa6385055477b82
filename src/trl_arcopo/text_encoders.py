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
Text encoders built in memory, without downloads: a T5 tokenizer over a word list and a small UMT5 encoder from a
config (random weights). The Moving Shapes world's encoder and the tests' tiny ones are built here.
"""

from __future__ import annotations

import torch
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel


def word_tokenizer(words: list[str]) -> T5Tokenizer:
    """A T5 tokenizer over an in-memory unigram vocabulary of `words` (no sentencepiece model, no download)."""
    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + w for w in words]
    return T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0)


def small_umt5_encoder(
    d_model: int = 32, vocab_size: int = 64, seed: int = 0, d_kv: int = 8, d_ff: int = 37
) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder built from a config, its weights drawn after `torch.manual_seed(seed)` (eval mode)."""
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()
