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
"""Tiny, offline components (built from configs, no Hub access) for tests, benchmarks and examples."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from transformers import T5Tokenizer, UMT5EncoderModel

from .models import CausalWanTransformer3DModel, FramePackingAutoencoder
from .pipelines import SelfForcingPipeline
from .sampling import self_forcing_scheduler
from .text_encoders import small_umt5_encoder, word_tokenizer


TINY_WORDS = [
    "a",
    "cat",
    "dog",
    "runs",
    "on",
    "the",
    "beach",
    "in",
    "snow",
    "red",
    "blue",
    "car",
    "city",
    "night",
    "fox",
    "jumps",
    "over",
]


def tiny_tokenizer(words: list[str] | None = None) -> T5Tokenizer:
    """A T5 tokenizer over a small in-memory unigram vocabulary (no sentencepiece model, no download)."""
    return word_tokenizer(words or TINY_WORDS)


def tiny_text_encoder(
    d_model: int = 32, vocab_size: int = 64, seed: int = 0, d_kv: int = 8, d_ff: int = 37
) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder built from a config (random weights, eval mode)."""
    return small_umt5_encoder(d_model, vocab_size, seed, d_kv, d_ff)


def tiny_transformer(
    in_channels: int = 16,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    ffn_dim: int = 32,
    text_dim: int = 32,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    seed: int = 0,
    causal: bool = True,
):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cls = CausalWanTransformer3DModel if causal else WanTransformer3DModel
    return cls(
        patch_size=patch_size, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=ffn_dim, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()  # fmt: skip


def tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def tiny_pipeline(
    with_vae: bool = False, seed: int = 0, pack_frames: bool = False, **transformer_kwargs
) -> SelfForcingPipeline:
    """
    A tiny `SelfForcingPipeline`: pixel space (3 channels, `vae=None`) by default, 16x16 videos of 9 frames in chunks
    of 3; with `with_vae=True`, a tiny Wan VAE (latent 16 channels, 32x32 videos of 9 frames -> 3 latent frames); with
    `pack_frames=True`, a `FramePackingAutoencoder` (9 channels, 16x16 videos of 9 frames -> 3 latent frames, one per
    chunk: `default_num_frames_per_chunk=1`).
    """
    if with_vae and pack_frames:
        raise ValueError("Pass at most one of `with_vae` and `pack_frames`.")
    vae = tiny_vae(seed) if with_vae else FramePackingAutoencoder(3, scale_factor_temporal=3) if pack_frames else None
    channels = vae.config.z_dim if vae is not None else 3
    pipe = SelfForcingPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed=seed),
        transformer=tiny_transformer(in_channels=channels, seed=seed, **transformer_kwargs),
        scheduler=self_forcing_scheduler(),
        vae=vae,
        default_height=32 if with_vae else 16,
        default_width=32 if with_vae else 16,
        default_num_frames=9,
        default_max_sequence_length=16,
        default_num_frames_per_chunk=1 if pack_frames else 3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cpu_allocations(prof) -> list[int]:
    """
    The bytes of every CPU allocation (positive) a `torch.profiler.profile(profile_memory=True)` recorded, in time
    order, and of every free (negative) of memory allocated while it recorded: a free of an older block (garbage of
    earlier work, collected meanwhile) is not the profiled work's, and counting it would lower its peak by however much
    the collector happened to free.
    """
    from torch._C._profiler import _EventType

    events = []

    def walk(event):
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live, sizes = set(), []
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue
        sizes.append(size)
    return sizes


def cpu_peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """
    `(peak, result)`: the CPU allocator's peak of live bytes while `fn(*args, **kwargs)` runs, above what was live when
    it started ([`cpu_allocations`], from `torch.profiler`'s memory events), and what `fn` returned.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    total = peak = 0
    for size in cpu_allocations(prof):
        total += size
        peak = max(peak, total)
    return peak, result
