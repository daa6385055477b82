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
Predict what one AR-CoPO iteration costs before running it: transformer FLOPs by phase, KV-cache, activation,
parameter and optimizer bytes, the peak memory of a process, and seconds on a given GPU at an assumed MFU.

Everything is computed from the configuration alone (closed forms over the transformer config and the video size; the
parameter counts of the frozen components from `torch.device("meta")` builds), without weights. The closed forms
mirror this library's code path (`sample_group`, `ARCoPOTrainer.compute_loss`, `CausalWanTransformer3DModel`, the
cache policies of `trl_arcopo.kv_cache`); see `docs/planning.md` for how they were derived and checked against
measurements.

```py
>>> from trl_arcopo.planning import plan
>>> p = plan({"num_generations": 12, "torch_dtype": "bfloat16", "bf16": True}, "self-forcing-1.3b", gpu="h200")
>>> print(p.to_markdown())
```
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .attention_window import check_cache_policy


MiB = 2**20
GiB = 2**30

#: LoRA targets of the trainer's default adapter (`trl_arcopo.policy.DEFAULT_LORA_TARGETS`, repeated here so that
#: planning imports no model code).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
SELF_FORCING_NUM_STEPS = 4


# ---------------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPUSpec:
    r"""
    A GPU's dense tensor-core peaks and memory.

    Args:
        name (`str`): the product name.
        bf16_flops (`float`): dense BF16/FP16 tensor-core peak (FLOP/s, without structured sparsity).
        tf32_flops (`float`): dense TF32 tensor-core peak (FLOP/s): what float32 matmuls run at.
        memory_bytes (`int`): device memory as the driver reports it (`nvidia-smi`'s total).
    """

    name: str
    bf16_flops: float
    tf32_flops: float
    memory_bytes: int


# Peaks are NVIDIA's datasheet numbers, dense (the datasheets list twice these "with sparsity"):
# - H100 SXM5 and H200 SXM: 989 TFLOP/s BF16, 494.5 TF32 (H100 datasheet; H200 datasheet, same compute);
# - H100 PCIe: 756 BF16, 378 TF32 (H100 datasheet);
# - A100 SXM4 80GB: 312 BF16, 156 TF32 (A100 datasheet);
# - L40S: 362.05 BF16, 183 TF32 (L40S datasheet);
# - L4: 121 BF16, 60 TF32 (L4 datasheet).
# Memory is the total that `nvidia-smi` reports for each board (80 GB HBM3 = 81559 MiB, 141 GB HBM3e = 143771 MiB,
# 80 GB HBM2e = 81920 MiB, 48 GB GDDR6 = 46068 MiB, 24 GB GDDR6 = 23034 MiB); the CUDA context takes a few hundred MiB
# of it.
GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("NVIDIA H100 SXM5 80GB", 989.4e12, 494.7e12, 81559 * MiB),
    "h100-pcie": GPUSpec("NVIDIA H100 PCIe 80GB", 756.5e12, 378.0e12, 81559 * MiB),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", 989.4e12, 494.7e12, 143771 * MiB),
    "a100": GPUSpec("NVIDIA A100 SXM4 80GB", 312.0e12, 156.0e12, 81920 * MiB),
    "l40s": GPUSpec("NVIDIA L40S 48GB", 362.05e12, 183.0e12, 46068 * MiB),
    "l4": GPUSpec("NVIDIA L4 24GB", 121.0e12, 60.0e12, 23034 * MiB),
}


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    """A `GPUSpec` by name (`"h100"`, `"h200"`, `"a100"`, `"l40s"`, ...) or as given."""
    if isinstance(gpu, GPUSpec):
        return gpu
    key = str(gpu).lower().replace("_", "-")
    if key not in GPUS:
        raise ValueError(f"Unknown `gpu={gpu!r}`; use one of {sorted(GPUS)} or pass a `GPUSpec(name, ...)`.")
    return GPUS[key]


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class TransformerShape:
    r"""
    What the plan needs of a (causal) Wan transformer config.

    Args:
        num_layers, num_attention_heads, attention_head_dim, ffn_dim, in_channels, out_channels, text_dim,
        freq_dim (`int`): as in diffusers' `WanTransformer3DModel` config.
        patch_size (`tuple[int, int, int]`): `(p_t, p_h, p_w)`; the causal transformer needs `p_t = 1`.
        cross_attn_norm (`bool`): whether the cross-attention has an affine LayerNorm.
    """

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int
    patch_size: tuple[int, int, int]
    cross_attn_norm: bool = True

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    @classmethod
    def from_config(cls, config: Mapping | Any) -> TransformerShape:
        """From a diffusers config (a `FrozenDict`, a dict, or an object with the same attributes)."""

        def get(key):
            value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
            if value is None and key not in ("cross_attn_norm",):
                raise ValueError(
                    f"The transformer config has no `{key}`: pass a Wan transformer config (e.g. "
                    "`pipe.transformer.config`) or the preset name 'self-forcing-1.3b'."
                )
            return value

        patch = tuple(int(p) for p in get("patch_size"))
        if len(patch) != 3 or patch[0] != 1:
            raise ValueError(f"`patch_size={list(patch)}`: the causal transformer needs (1, p_h, p_w).")
        norm = get("cross_attn_norm")
        return cls(
            num_layers=int(get("num_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            attention_head_dim=int(get("attention_head_dim")),
            ffn_dim=int(get("ffn_dim")),
            in_channels=int(get("in_channels")),
            out_channels=int(get("out_channels") or get("in_channels")),
            text_dim=int(get("text_dim")),
            freq_dim=int(get("freq_dim")),
            patch_size=patch,
            cross_attn_norm=True if norm is None else bool(norm),
        )

    def to_config(self) -> dict[str, Any]:
        """Keyword arguments of `CausalWanTransformer3DModel` (diffusers' defaults for everything else)."""
        return dict(
            patch_size=self.patch_size,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=self.cross_attn_norm,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        )


@dataclass(frozen=True)
class VideoShape:
    r"""
    The video of a rollout and its latent layout.

    Args:
        height, width, num_frames (`int`): pixels and frames.
        num_frames_per_chunk (`int`): latent frames per chunk (Self-Forcing: 3).
        vae_scale_factor_temporal, vae_scale_factor_spatial (`int`): the VAE's compression (Wan: 4 and 8; `1` and `1`
            without a VAE).
        frame_packing (`bool`): a `FramePackingAutoencoder` (`F / t` latent frames) rather than a causal VAE
            (`1 + (F - 1) / t`).
        max_sequence_length (`int`): text tokens of the prompt embeddings.
        cache_policy (`str`): how the generator keeps the keys and values of the committed frames (the pipeline
            config's `cache_policy`, see `trl_arcopo.kv_cache.make_cache`):

            - `"full"`: every committed frame is stored (Self-Forcing, Causal-Forcing); with `local_attn_frames` a
              chunk attends to fewer keys, but the storage still holds every frame;
            - `"rolling"`: `local_attn_frames` frames per video (the sink frames and a ring of recent ones), whatever
              the video's length (LongLive);
            - `"recompute"`: the clean latents of the context (`local_attn_frames - num_frames_per_chunk` frames, the
              sink frames included) and their keys and values, rebuilt every chunk by a block-causal forward over the
              context instead of the commit pass (Krea realtime).
        local_attn_frames (`int`, *optional*): frames a chunk attends to, itself included; `None`: every committed
            frame (required by `"rolling"`).
        sink_frames (`int`): first frames of the video that stay in the window.
    """

    height: int
    width: int
    num_frames: int
    num_frames_per_chunk: int = 3
    vae_scale_factor_temporal: int = 1
    vae_scale_factor_spatial: int = 1
    frame_packing: bool = False
    max_sequence_length: int = 512
    cache_policy: str = "full"
    local_attn_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self):
        policy, window, sink, chunk = (self.cache_policy, self.local_attn_frames, self.sink_frames,
                                       self.num_frames_per_chunk)  # fmt: skip
        check_cache_policy(policy, window, sink)
        if policy != "full" and window is not None and chunk > window - sink:
            raise ValueError(
                f"A chunk of `num_frames_per_chunk={chunk}` frames does not fit the window of "
                f"`local_attn_frames={window}` with `sink_frames={sink}` (`cache_policy={policy!r}`)."
            )

    @classmethod
    def from_pipeline(cls, pipeline) -> VideoShape:
        """The defaults of a `SelfForcingPipeline` (its config and VAE factors)."""
        config = pipeline.config
        return cls(
            height=config.default_height,
            width=config.default_width,
            num_frames=config.default_num_frames,
            num_frames_per_chunk=getattr(config, "default_num_frames_per_chunk", 3),
            vae_scale_factor_temporal=pipeline.vae_scale_factor_temporal,
            vae_scale_factor_spatial=pipeline.vae_scale_factor_spatial,
            frame_packing=hasattr(pipeline.vae, "latent_num_frames"),
            max_sequence_length=config.default_max_sequence_length,
            cache_policy=getattr(config, "cache_policy", "full"),
            local_attn_frames=getattr(config, "local_attn_frames", None),
            sink_frames=getattr(config, "sink_frames", 0),
        )

    @property
    def latent_frames(self) -> int:
        t, f = self.vae_scale_factor_temporal, self.num_frames
        if self.frame_packing:
            if f % t:
                raise ValueError(f"`num_frames={f}` must be a multiple of the frame packing's {t} frames.")
            return f // t
        if t > 1:
            if (f - 1) % t:
                raise ValueError(
                    f"`num_frames={f}` must be 1 + a multiple of the VAE's temporal factor {t} (e.g. 81)."
                )
            return (f - 1) // t + 1
        return f

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_scale_factor_spatial

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_scale_factor_spatial

    def pixel_frames(self, latent_frames: int) -> int:
        """The `num_frames` that gives `latent_frames` latent frames (the inverse of `latent_frames`)."""
        t = self.vae_scale_factor_temporal
        return latent_frames * t if self.frame_packing or t == 1 else (latent_frames - 1) * t + 1

    @property
    def num_chunks(self) -> int:
        frames, chunk = self.latent_frames, self.num_frames_per_chunk
        if chunk < 1 or frames % chunk:
            near = [n for n in (frames - frames % chunk, frames - frames % chunk + chunk) if n > 0 and chunk > 0]
            example = " or ".join(f"{self.pixel_frames(n)} ({n} latent frames)" for n in near)
            raise ValueError(
                f"{frames} latent frames (`num_frames={self.num_frames}`) are not a multiple of "
                f"`num_frames_per_chunk={chunk}`: change `num_frames`"
                + (f" (e.g. {example})" if example else "")
                + " or `num_frames_per_chunk`."
            )
        return frames // chunk

    # ---- the cache policy, in latent frames (mirrors `KVCache.context_slices` and `RecomputeKVCache`)
    def context_frames(self, committed: int) -> int:
        """
        Frames a chunk starting after `committed` frames attends to before itself: the sink and the most recent
        frames of its window (every committed frame without a window). For `"recompute"` these are the context whose
        latents the cache keeps (`RecomputeKVCache.context_indices`).
        """
        window, sink, chunk = self.local_attn_frames, self.sink_frames, self.num_frames_per_chunk
        if window is None:
            return committed
        if self.cache_policy == "recompute":
            recent = max(window - sink - chunk, 0)
            return committed if committed - recent <= sink else sink + recent
        recent_start = min(max(0, committed + chunk - (window - sink)), committed)  # `KVCache.context_slices`
        return min(sink, recent_start) + committed - recent_start

    def attended_frames(self, chunk: int) -> int:
        """Frames a pass of chunk `chunk` (a denoising step or a commit) attends to, itself included."""
        frames = self.num_frames_per_chunk
        return self.context_frames(chunk * frames) + frames

    def commit_forwards(self, chunk: int) -> list[tuple[int, int]]:
        """
        `(frames, attended frames)` of each transformer forward that commits chunk `chunk`: its own pass at `t = 0`;
        for `"recompute"`, the forwards that rebuild the next chunk's context (`RecomputeKVCache.commit`: its `k`
        frames in blocks of `num_frames_per_chunk` from its first frame, each attending to the blocks before it).
        """
        frames = self.num_frames_per_chunk
        if self.cache_policy != "recompute":
            return [(frames, self.attended_frames(chunk))]
        k = self.context_frames((chunk + 1) * frames)
        return [(min(frames, k - start), min(start + frames, k)) for start in range(0, k, frames)]

    def prefix_cache_frames(self, pivot: int) -> int:
        """Frames of keys and values the prefix's cache (chunks `< pivot`) stores per video."""
        committed = pivot * self.num_frames_per_chunk
        if self.cache_policy == "rolling":
            return self.local_attn_frames if committed else 0
        return self.context_frames(committed) if self.cache_policy == "recompute" else committed

    def branch_cache_frames(self, pivot: int) -> int:
        """
        Frames of keys and values a branch forked at `pivot` stores beyond the prefix, at the end of its rollout (it
        commits chunks `pivot .. L - 2`; the last chunk is never committed).
        """
        frames, last = self.num_frames_per_chunk, self.num_chunks - 1
        if pivot >= last:
            return 0
        if self.cache_policy == "rolling":
            return self.local_attn_frames
        if self.cache_policy == "recompute":
            return self.context_frames(last * frames)
        return (last - pivot) * frames

    def describe_cache(self) -> str:
        """The policy and window in words."""
        window = self.local_attn_frames
        if window is None:
            return f"KV cache {self.cache_policy}, global attention"
        return f"KV cache {self.cache_policy}, window {window} frames ({self.sink_frames} sink)"

    def tokens_per_frame(self, transformer: TransformerShape) -> int:
        _, p_h, p_w = transformer.patch_size
        s = self.vae_scale_factor_spatial
        if self.height % (s * p_h) or self.width % (s * p_w):
            raise ValueError(
                f"`height={self.height}` and `width={self.width}` must be divisible by {s * p_h} and {s * p_w} "
                f"(VAE factor {s} x patch size {p_h}x{p_w})."
            )
        return (self.latent_height // p_h) * (self.latent_width // p_w)


# ---------------------------------------------------------------------------------------------------- presets
#: The published Wan2.1-T2V-1.3B transformer config (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer/config.json`),
#: which Self-Forcing fine-tunes.
WAN_2_1_T2V_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
#: The Wan2.1-T2V-14B transformer config, which Krea realtime 14B fine-tunes: dim 5120 = 40 heads x 128, 40 layers, FFN
#: 13824, text dim 4096, patch (1, 2, 2), 16 latent channels. These are diffusers' `WanTransformer3DModel` defaults
#: (diffusers 0.42.1, `models/transformers/transformer_wan.py`: its defaults are the 14B's), the values of Wan's own
#: `wan/configs/wan_t2v_14B.py` (`dim=5120`, `ffn_dim=13824`, `num_heads=40`, `num_layers=40`, `freq_dim=256`) and of
#: the 14B configs in diffusers' `scripts/convert_wan_to_diffusers.py`; the rest as the 1.3B's.
WAN_2_1_T2V_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
#: Wan's text encoder: the UMT5-XXL encoder (`google/umt5-xxl`).
UMT5_XXL_ENCODER = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
)  # fmt: skip


@dataclass(frozen=True)
class ModelPreset:
    r"""
    A generator the plan knows without its files.

    Args:
        transformer (`dict`): the transformer config.
        video ([`VideoShape`]): the default video and cache policy (the pipeline's defaults).
        text_encoder_parameters, vae_parameters (`int`): parameters of the frozen components that sit on the device
            next to the transformer (`torch.device("meta")` counts of their published configs; checked in the tests).
        num_denoising_steps (`int`), sampler (`str`): the default schedule.
    """

    transformer: dict
    video: VideoShape
    text_encoder_parameters: int = 0
    vae_parameters: int = 0
    num_denoising_steps: int = SELF_FORCING_NUM_STEPS
    sampler: str = "consistency"


UMT5_XXL_PARAMETERS = 5_680_910_336  # UMT5EncoderModel(UMT5_XXL_ENCODER)
WAN_2_1_VAE_PARAMETERS = 126_892_531  # AutoencoderKLWan() (diffusers' default is Wan2.1's VAE)


def _wan_video(num_frames_per_chunk: int = 3, cache_policy: str = "full", local_attn_frames=None, sink_frames=0):
    """Wan2.1's 480x832 video of 81 frames (VAE 4x temporal, 8x spatial), 512 text tokens, and a cache policy."""
    return VideoShape(480, 832, 81, num_frames_per_chunk, 4, 8, False, 512, cache_policy, local_attn_frames,
                      sink_frames)  # fmt: skip


PRESETS: dict[str, ModelPreset] = {
    # Self-Forcing (Wan2.1-T2V-1.3B): 480x832, 81 frames -> 21 latent frames (VAE 4x temporal, 8x spatial), 7 chunks of
    # 3, 30x52 = 1560 tokens per latent frame, 512 text tokens; UMT5-XXL text encoder and Wan2.1 VAE on the device.
    "self-forcing-1.3b": ModelPreset(
        transformer=WAN_2_1_T2V_1_3B,
        video=_wan_video(),
        text_encoder_parameters=UMT5_XXL_PARAMETERS,
        vae_parameters=WAN_2_1_VAE_PARAMETERS,
    ),
    # The others as `trl_arcopo.convert.pipeline_settings` configures each converted generator (every one 4 steps).
    # LongLive 1.0 (Wan2.1-T2V-1.3B): chunks of 3, a rolling cache of 12 frames with 3 sink frames.
    "longlive-1.3b": ModelPreset(
        WAN_2_1_T2V_1_3B, _wan_video(3, "rolling", 12, 3), UMT5_XXL_PARAMETERS, WAN_2_1_VAE_PARAMETERS
    ),
    # Causal-Forcing (Wan2.1-T2V-1.3B), every committed frame cached: chunk-wise (3 frames) and frame-wise (1 frame).
    "causal-forcing-1.3b": ModelPreset(WAN_2_1_T2V_1_3B, _wan_video(3), UMT5_XXL_PARAMETERS, WAN_2_1_VAE_PARAMETERS),
    "causal-forcing-1.3b-framewise": ModelPreset(
        WAN_2_1_T2V_1_3B, _wan_video(1), UMT5_XXL_PARAMETERS, WAN_2_1_VAE_PARAMETERS
    ),
    # Krea realtime 14B (Wan2.1-T2V-14B): chunks of 3; the keys and values of the context (the first frame and the 2
    # most recent: 6 frames with the chunk) recomputed every chunk; the 1.3B's text encoder and VAE.
    "krea-14b": ModelPreset(
        WAN_2_1_T2V_14B, _wan_video(3, "recompute", 6, 1), UMT5_XXL_PARAMETERS, WAN_2_1_VAE_PARAMETERS
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; use one of {sorted(PRESETS)}.")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------- settings
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit")


@dataclass(frozen=True)
class RunSettings:
    r"""
    The knobs of a run that the cost depends on (an [`ARCoPOConfig`], a YAML of `examples/train_arcopo.py`, or
    command-line overrides reduce to these).

    Args:
        num_generations (`int`): `G`. num_anchors (`int`): `K`. num_iterations (`int`): inner updates per rollout.
        per_device_train_batch_size (`int`): prompts (groups) per process and rollout, `B`.
        num_processes (`int`): data-parallel processes (one GPU each).
        num_denoising_steps (`int`): `T`. train_denoising_steps (`tuple[int]`, *optional*): the trained steps.
        beta (`float`): with `beta > 0` the update also runs the reference (no autograd) at the anchors.
        loss_type (`str`): `"arcopo"` or `"sde_grpo"` (trains `T - 1` steps by default).
        pivot_chunk (`int`, *optional*): the fork point; `None` is uniform (costs are expectations over it, and the
            memory is that of the worst pivot, the last chunk).
        sampler (`str`): `"consistency"` (stores re-noise) or `"ode"`.
        torch_dtype (`str`): the weights' dtype. mixed_precision (`str`, *optional*): `"bf16"` or `"fp16"`: the
            trainer's forwards run under `torch.autocast` (accelerate wraps the transformer's forward).
        lora_r (`int`), lora_target_modules (`tuple[str]` or `str`): the adapter (peft's matching: a module name or a
            `.`-suffix of one; a string is a regular expression matched against the whole name).
        gradient_checkpointing (`bool`): diffusers' checkpointing of every transformer block.
        optim (`str`): a `TrainingArguments.optim`; 8-bit AdamW (`"adamw_bnb_8bit"`) stores two 1-byte states.
        training_mode (`str`): only `"on_policy"` iterations are planned.
        rollout_batch_size (`int`, *optional*): branches per forward in the rollout (`None`: all `B·G`).
        anchor_batch_size (`int`, *optional*): anchors per forward and backward in the update (`None`: all `K`).
        offload_text_encoder (`bool`): the text encoder stays on the CPU (its weights are not on the device).
        decode_batch_size (`int`, *optional*): videos per VAE decode call (`None`: all `B·G`).
        reward_window_chunks (`int`, *optional*), reward_context_chunks (`int`): the chunks the rewards score (`None`:
            the whole video); with a window the trainer keeps only those frames of each decoded video.
        split_groups_across_processes (`bool`): each process rolls out `G / num_processes` of every group and updates
            on `K / num_processes` anchors (every process builds the same prefix and holds the gathered group).
        fsdp (`bool`): the transformer is sharded over the `num_processes` processes (FSDP2 over its blocks,
            `examples/accelerate_configs/fsdp.yaml`): each process holds `1 / num_processes` of its weights, of the
            LoRA, of the LoRA's gradients and of the optimizer state, plus the parameters outside the blocks and two
            blocks gathered at a time (the one running and the one prefetched); the text encoder and the VAE are whole
            on every process. The all-gathers' time is not counted (the seconds assume they overlap the compute).
    """

    num_generations: int = 12
    num_anchors: int = 4
    num_iterations: int = 2
    per_device_train_batch_size: int = 1
    num_processes: int = 1
    num_denoising_steps: int = SELF_FORCING_NUM_STEPS
    train_denoising_steps: tuple[int, ...] | None = None
    beta: float = 0.0
    loss_type: str = "arcopo"
    pivot_chunk: int | None = None
    sampler: str = "consistency"
    torch_dtype: str = "float32"
    mixed_precision: str | None = None
    lora_r: int = 64
    lora_target_modules: tuple[str, ...] | str = DEFAULT_LORA_TARGETS
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    training_mode: str = "on_policy"
    rollout_batch_size: int | None = None
    anchor_batch_size: int | None = None
    offload_text_encoder: bool = False
    decode_batch_size: int | None = 1
    reward_window_chunks: int | None = None
    reward_context_chunks: int = 0
    split_groups_across_processes: bool = False
    fsdp: bool = False

    def __post_init__(self):
        checks = [
            ("num_generations", self.num_generations >= 2, "at least 2 (paper: 12)"),
            ("num_anchors", 1 <= self.num_anchors <= self.num_generations, "in [1, num_generations]"),
            ("num_iterations", self.num_iterations >= 1, "at least 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "at least 1"),
            ("num_processes", self.num_processes >= 1, "at least 1"),
            ("num_denoising_steps", self.num_denoising_steps >= 1, "at least 1"),
            ("lora_r", self.lora_r >= 1, "at least 1"),
            ("beta", self.beta >= 0, "non-negative"),
            ("rollout_batch_size", self.rollout_batch_size is None or self.rollout_batch_size >= 1, "None or >= 1"),
            ("anchor_batch_size", self.anchor_batch_size is None or self.anchor_batch_size >= 1, "None or >= 1"),
            ("decode_batch_size", self.decode_batch_size is None or self.decode_batch_size >= 1, "None or >= 1"),
        ]
        if self.fsdp:
            checks.append(("num_processes", self.num_processes >= 2, "at least 2 with `fsdp` (it shards over them)"))
        if self.split_groups_across_processes:
            checks += [
                ("num_generations", self.num_generations % self.num_processes == 0, "a multiple of num_processes"),
                ("num_anchors", self.num_anchors % self.num_processes == 0, "a multiple of num_processes"),
            ]
        for name, ok, fix in checks:
            if not ok:
                raise ValueError(f"`{name}={getattr(self, name)}` must be {fix}.")
        if self.torch_dtype not in DTYPE_BYTES:
            raise ValueError(f"`torch_dtype={self.torch_dtype!r}` is not one of {sorted(DTYPE_BYTES)}.")
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"`mixed_precision={self.mixed_precision!r}` must be None, 'bf16' or 'fp16'.")
        if self.loss_type not in ("arcopo", "sde_grpo"):
            raise ValueError(f"`loss_type={self.loss_type!r}` must be 'arcopo' or 'sde_grpo'.")
        if self.training_mode != "on_policy":
            raise ValueError(
                f"`training_mode={self.training_mode!r}`: the plan covers on-policy iterations (one rollout and its "
                "inner updates); plan with `training_mode='on_policy'` (a semi-on-policy step costs one update plus "
                "the reference forwards and the prefix rebuild of the drawn groups)."
            )
        steps = self.trained_steps
        if not steps or max(steps) >= self.num_denoising_steps or min(steps) < 0:
            raise ValueError(
                f"`train_denoising_steps={list(steps)}` must be distinct step indices in [0, {self.num_denoising_steps})."
            )

    @property
    def trained_steps(self) -> tuple[int, ...]:
        if self.train_denoising_steps is not None:
            return tuple(sorted(set(self.train_denoising_steps)))
        return tuple(range(self.num_denoising_steps - (1 if self.loss_type == "sde_grpo" else 0)))

    @property
    def uses_8bit_optimizer(self) -> bool:
        return self.optim in OPTIMIZERS_8BIT

    @property
    def branches_per_process(self) -> int:
        """Branches of each group this process rolls out (`G`, or its share of a group split over processes)."""
        split = self.split_groups_across_processes
        return self.num_generations // self.num_processes if split else self.num_generations

    @property
    def anchors_per_process(self) -> int:
        """Anchors of each group this process updates on."""
        return self.num_anchors // self.num_processes if self.split_groups_across_processes else self.num_anchors

    @property
    def branches_per_forward(self) -> int:
        """Branches of the rollout's forwards: a sub-batch of one prompt's, or every branch of the process."""
        g = self.branches_per_process
        if self.rollout_batch_size is None:
            return g if self.split_groups_across_processes else self.per_device_train_batch_size * g
        return min(self.rollout_batch_size, g)

    @property
    def anchors_per_forward(self) -> int:
        """Anchors of each group in one forward and backward of the update."""
        k = self.anchors_per_process
        return k if self.anchor_batch_size is None else min(self.anchor_batch_size, k)

    @classmethod
    def from_config(cls, config: Mapping | Any, **overrides) -> RunSettings:
        """
        From an [`ARCoPOConfig`] or a dict of its fields (a YAML of `examples/train_arcopo.py`, which may also hold
        `torch_dtype`, `lora_r` and `lora_target_modules`). Unknown keys are ignored; `overrides` win (`None` values
        are ignored).
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}

        def value(key):
            if key in overrides:
                return overrides[key]
            return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

        def pick(key, default=None):
            found = value(key)
            return default if found is None else found

        def present(key):  # set, possibly to None (an `ARCoPOConfig` always has every field)
            return key in overrides or (key in config if isinstance(config, Mapping) else hasattr(config, key))

        sigmas = value("denoising_sigmas")
        mixed = "bf16" if value("bf16") else "fp16" if value("fp16") else None
        if "mixed_precision" in overrides:
            mixed = None if overrides["mixed_precision"] == "no" else overrides["mixed_precision"]
        checkpointing = value("activation_checkpointing") if "gradient_checkpointing" not in overrides else None
        if checkpointing is None:
            checkpointing = value("gradient_checkpointing")
        targets = pick("lora_target_modules", DEFAULT_LORA_TARGETS)
        steps = value("train_denoising_steps")
        optim = pick("optim", "adamw_torch")
        return cls(
            num_generations=int(pick("num_generations", 12)),
            num_anchors=int(pick("num_anchors", 4)),
            num_iterations=int(pick("num_iterations", 2)),
            per_device_train_batch_size=int(pick("per_device_train_batch_size", 1)),
            num_processes=int(pick("num_processes", 1)),
            num_denoising_steps=len(sigmas) if sigmas else int(pick("num_denoising_steps", SELF_FORCING_NUM_STEPS)),
            train_denoising_steps=tuple(int(s) for s in steps) if steps is not None else None,
            beta=float(pick("beta", 0.0)),
            loss_type=str(pick("loss_type", "arcopo")),
            pivot_chunk=None if value("pivot_chunk") is None else int(value("pivot_chunk")),
            sampler=str(pick("sampler", "consistency")),
            torch_dtype=str(pick("torch_dtype", "float32")).replace("torch.", ""),
            mixed_precision=mixed,
            lora_r=int(pick("lora_r", 64)),
            lora_target_modules=targets if isinstance(targets, str) else tuple(targets),
            gradient_checkpointing=bool(checkpointing),
            optim=str(getattr(optim, "value", optim)),
            training_mode=str(pick("training_mode", "on_policy")),
            rollout_batch_size=_optional_int(value("rollout_batch_size")),
            anchor_batch_size=_optional_int(value("anchor_batch_size")),
            offload_text_encoder=bool(pick("offload_text_encoder", False)),
            decode_batch_size=_optional_int(value("decode_batch_size")) if present("decode_batch_size") else 1,
            reward_window_chunks=_optional_int(value("reward_window_chunks")),
            reward_context_chunks=int(pick("reward_context_chunks", 0)),
            split_groups_across_processes=bool(pick("split_groups_across_processes", False)),
            fsdp=_flag(pick("fsdp", False)),
        )


def _flag(value) -> bool:
    """A boolean setting that a YAML or the command line may give as a string (`"false"`, `"no"`: off)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "0", "none")
    return bool(value)


def _optional_int(value) -> int | None:
    return None if value is None or str(value).lower() == "none" else int(value)


@dataclass(frozen=True)
class _Precision:
    """Bytes per element of what the forward computes, from the weights' dtype and autocast (see `_saved_block`)."""

    weight: int  # frozen weights, KV cache, prompt embeddings, the residual stream
    autocast: bool

    @property
    def act(self) -> int:  # linear and attention outputs
        return 2 if self.autocast else self.weight

    @property
    def lora_copy(self) -> int | None:
        """Bytes of the copy of its input that each LoRA module saves; `None`: no copy (fp32, the input is shared)."""
        if self.weight == 4 and not self.autocast:
            return None
        return 2 if self.autocast else 4

    @property
    def lora_out(self) -> int:
        return 2 if self.autocast else 4


# ---------------------------------------------------------------------------------------------------- modules
# The linear layers of one block of the causal Wan transformer: (name, in, out, rows) where rows is "tokens" (the
# chunk's video tokens) or "text" (the prompt's tokens).
def _block_linears(shape: TransformerShape) -> list[tuple[str, int, int, str]]:
    d, f = shape.dim, shape.ffn_dim
    out = [(f"attn1.{m}", d, d, "tokens") for m in ("to_q", "to_k", "to_v", "to_out.0")]
    out += [("attn2.to_q", d, d, "tokens"), ("attn2.to_k", d, d, "text"), ("attn2.to_v", d, d, "text")]
    out += [("attn2.to_out.0", d, d, "tokens"), ("ffn.net.0.proj", d, f, "tokens"), ("ffn.net.2", f, d, "tokens")]
    return out


def _outer_linears(shape: TransformerShape) -> list[tuple[str, int, int, str]]:
    """Linear layers outside the blocks (rows: "tokens", "text" or "frames"); the patch embedding is a linear map too."""
    d = shape.dim
    return [
        ("patch_embedding", shape.in_channels * shape.patch_volume, d, "tokens"),
        ("condition_embedder.time_embedder.linear_1", shape.freq_dim, d, "frames"),
        ("condition_embedder.time_embedder.linear_2", d, d, "frames"),
        ("condition_embedder.time_proj", d, 6 * d, "frames"),
        ("condition_embedder.text_embedder.linear_1", shape.text_dim, d, "text"),
        ("condition_embedder.text_embedder.linear_2", d, d, "text"),
        ("proj_out", d, shape.out_channels * shape.patch_volume, "tokens"),
    ]


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """peft's `target_modules` matching: a regex on the full name, or a name that is a key or ends with `.key`."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return name != "proj_out"
        return re.fullmatch(targets, name) is not None
    return any(name == key or name.endswith("." + key) for key in targets)


@dataclass(frozen=True)
class _LoRALayout:
    """Which linear layers carry the adapter: per block (relative names) and outside the blocks."""

    blocks: tuple[frozenset, ...]
    outer: frozenset

    @classmethod
    def build(cls, shape: TransformerShape, targets: Sequence[str] | str) -> _LoRALayout:
        blocks = tuple(
            frozenset(n for n, *_ in _block_linears(shape) if _matches(f"blocks.{i}.{n}", targets))
            for i in range(shape.num_layers)
        )
        outer = frozenset(n for n, *_ in _outer_linears(shape) if _matches(n, targets))
        if not any(blocks) and not outer:
            raise ValueError(
                f"`lora_target_modules={targets!r}` matches no linear layer of the transformer; use names such as "
                f"{list(DEFAULT_LORA_TARGETS)}."
            )
        return cls(blocks, outer)

    def tensor_sizes(self, shape: TransformerShape, r: int) -> list[int]:
        """Elements of every LoRA factor: `A` `[r, in]` and `B` `[out, r]` of each targeted layer."""
        sizes = [s for b in self.blocks for n, i, o, _ in _block_linears(shape) if n in b for s in (r * i, o * r)]
        return sizes + [s for n, i, o, _ in _outer_linears(shape) if n in self.outer for s in (r * i, o * r)]

    def num_parameters(self, shape: TransformerShape, r: int) -> int:
        return sum(self.tensor_sizes(shape, r))

    def block_parameters(self, shape: TransformerShape, r: int) -> int:
        """LoRA parameters of the block with the most (what FSDP gathers per block)."""
        linears = _block_linears(shape)
        return max(sum(r * (i + o) for n, i, o, _ in linears if n in block) for block in self.blocks)


def count_parameters(cls, config: Mapping, **kwargs) -> int:
    """Parameters of `cls` built from `config` on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = cls.from_config(config, **kwargs) if hasattr(cls, "from_config") else cls(config, **kwargs)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def transformer_parameters(shape: TransformerShape) -> int:
    """Exact parameter count of `CausalWanTransformer3DModel` with this shape (a meta-device build)."""
    from .models import CausalWanTransformer3DModel

    return count_parameters(CausalWanTransformer3DModel, shape.to_config())


def wan_block_parameters(shape: TransformerShape) -> int:
    """
    Parameters of one Wan transformer block, in closed form: self- and cross-attention (q, k, v, out with biases:
    `8 (D² + D)`), their q/k RMSNorms (`4 D`), the cross-attention's affine LayerNorm (`2 D`), the FFN
    (`2 D F + F + D`) and the block's modulation table (`6 D`).
    """
    d, f = shape.dim, shape.ffn_dim
    return 8 * d * d + 2 * d * f + f + (21 if shape.cross_attn_norm else 19) * d


def wan_transformer_parameters(shape: TransformerShape) -> int:
    """
    Parameters of a Wan transformer, in closed form: the blocks, the patch embedding (a `p_t x p_h x p_w`
    convolution), the time embedder (`freq -> D -> D`) and its `6 D` projection, the text embedder
    (`text -> D -> D`), the output projection and the output modulation table (`2 D`); the norms outside the blocks
    have no affine parameters.
    """
    d, pv = shape.dim, shape.patch_volume
    outer = (shape.in_channels * pv + 1) * d + (shape.freq_dim + 1) * d + (d + 1) * d + (d + 1) * 6 * d
    outer += (shape.text_dim + 1) * d + (d + 1) * d + (d + 1) * shape.out_channels * pv + 2 * d
    return shape.num_layers * wan_block_parameters(shape) + outer


# ---------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class _Pass:
    """
    One transformer call on a chunk, per video: `tokens` queries attending to `keys` (its own included). A sub-batch
    of a batch computes its patch and timestep embeddings at the whole batch's size
    (`CausalWanTransformer3DModel.sub_batch`): `embed_scale` videos' worth per video.
    """

    tokens: int
    keys: int
    text: int
    frames: int
    embed_scale: float = 1.0


def forward_flops(shape: TransformerShape, p: _Pass, lora: _LoRALayout | None, r: int) -> float:
    """
    Matmul FLOPs (2 per multiply-add) of one forward of one video's chunk: every linear layer (the patch embedding
    included), self-attention over `keys` keys, cross-attention over the text; LoRA's two factors where `lora` is
    active (`None`: the adapter is disabled, the reference policy). Elementwise work is not counted, as in
    `torch.utils.flop_counter`.
    """
    rows = {"tokens": p.tokens, "text": p.text, "frames": p.frames}
    total = 0.0
    for n, i, o, kind in _outer_linears(shape):
        scale = p.embed_scale if n == "patch_embedding" or kind == "frames" else 1.0
        total += scale * (2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if lora and n in lora.outer else 0))
    d = shape.dim
    for layer in range(shape.num_layers):
        targets = lora.blocks[layer] if lora else ()
        for n, i, o, kind in _block_linears(shape):
            total += 2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if n in targets else 0)
        total += 2 * 2 * p.tokens * p.keys * d + 2 * 2 * p.tokens * p.text * d  # QK^T and AV, self and cross
    return total


def backward_flops(shape: TransformerShape, p: _Pass, lora: _LoRALayout, r: int, checkpointing: bool) -> float:
    """
    Matmul FLOPs of the backward of one chunk forward when only the LoRA factors train: input gradients of every
    linear layer whose input needs one, weight gradients of the LoRA factors only, attention backward as the fused
    kernels compute it (5 products: scores recomputed, then dV, dP, dQ, dK), and with `checkpointing` the forward of
    every block once more. Gradients start at the first LoRA output: the patch embedding and the text and time
    embedders need none.
    """
    rows = {"tokens": p.tokens, "text": p.text, "frames": p.frames}
    d = shape.dim
    total = 0.0

    def linear(name, i, o, kind, grad_in, targeted) -> bool:
        nonlocal total
        m = rows[kind]
        if grad_in:
            total += 2 * m * i * o  # dX = dY W (frozen weight: no weight gradient)
        if targeted:
            total += 2 * m * r * o * 2 + 2 * m * i * r  # dB, d(A x), dA
            total += 2 * m * i * r if grad_in else 0  # dX through A
        return grad_in or targeted

    outer = lora.outer
    grad = False
    for n, i, o, kind in _outer_linears(shape)[:1]:  # patch embedding
        grad = linear(n, i, o, kind, False, n in outer)
    text_grad = False
    for n, i, o, kind in _outer_linears(shape)[4:6]:  # text embedder
        text_grad = linear(n, i, o, kind, text_grad, n in outer)

    def attention(name, t, grad, kv_kind, kv_grad, keys) -> bool:
        """One attention's backward (self: keys and values from the tokens; cross: from the text)."""
        nonlocal total
        q = linear(f"{name}.to_q", d, d, "tokens", grad, f"{name}.to_q" in t)
        k = linear(f"{name}.to_k", d, d, kv_kind, kv_grad, f"{name}.to_k" in t)
        v = linear(f"{name}.to_v", d, d, kv_kind, kv_grad, f"{name}.to_v" in t)
        attn = q or k or v
        if attn:
            total += 5 * 2 * p.tokens * keys * d
        return linear(f"{name}.to_out.0", d, d, "tokens", attn, f"{name}.to_out.0" in t) or grad

    for layer in range(shape.num_layers):
        t = lora.blocks[layer]
        grad = attention("attn1", t, grad, "tokens", grad, p.keys)
        grad = attention("attn2", t, grad, "text", text_grad, p.text)
        hidden = linear("ffn.net.0.proj", d, shape.ffn_dim, "tokens", grad, "ffn.net.0.proj" in t)
        grad = linear("ffn.net.2", shape.ffn_dim, d, "tokens", hidden, "ffn.net.2" in t) or grad
    n, i, o, kind = _outer_linears(shape)[-1]
    linear(n, i, o, kind, grad, n in outer)
    if checkpointing:
        per_layer = [
            2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if n in lora.blocks[layer] else 0)
            for layer in range(shape.num_layers)
            for n, i, o, kind in _block_linears(shape)
        ]
        total += sum(per_layer) + shape.num_layers * (2 * 2 * p.tokens * (p.keys + p.text) * d)
    return total


# ---------------------------------------------------------------------------------------------------- activations
def _saved_block(
    shape: TransformerShape, b: int, p: _Pass, targets: frozenset, r: int, prec: _Precision, grad_in: bool
) -> tuple[int, bool]:
    """
    Bytes autograd saves for the backward in one block of `CausalWanTransformer3DModel._block` (batch `b`), and
    whether its output needs a gradient. Derived from the block's code and torch's derivative formulas, in order:
    LayerNorm keeps its fp32 input and two per-token statistics; the adaLN modulation keeps `1 + scale` (fp32,
    per frame) and the gates keep the block's modulation `[b, F, 6, D]`; every LoRA module keeps its input (a copy in
    the LoRA dtype, except in float32 where the input itself is kept once) and its rank-`r` projection; the q/k
    RMSNorms keep their fp32 input and statistics; attention keeps q, the keys and values it attended (the cached
    context included: the concatenation is a new tensor), its output and the log-sum-exp; GELU keeps its input.
    Frozen linear layers keep nothing (their weights are parameters).
    """
    d, h, f = shape.dim, shape.num_attention_heads, shape.ffn_dim
    m, t, frames = b * p.tokens, b * p.text, p.frames
    act, lo = prec.act, prec.lora_out
    saved = 0

    def lora_inputs(rows: int, width: int, modules: list[str], shared_already_saved: bool = False) -> int:
        hit = [n for n in modules if n in targets]
        if not hit:
            return 0
        if prec.lora_copy is None:
            return 0 if shared_already_saved else rows * width * 4
        return len(hit) * rows * width * prec.lora_copy

    def rank_outputs(rows: int, modules: list[str]) -> int:
        return sum(rows * r * lo for n in modules if n in targets)

    # 1. self-attention
    if grad_in:
        saved += m * d * 4 + 2 * m * 4 + b * frames * d * 4  # norm1 (fp32 input, mean, rstd) and 1 + scale
    qkv = ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    saved += lora_inputs(m, d, qkv) + rank_outputs(m, [*qkv, "attn1.to_out.0"])
    q, k, v = (grad_in or n in targets for n in qkv)
    saved += (q + k) * (m * d * 4 + m * 4)  # RMSNorm of q and k (fp32)
    attn = q or k or v
    if attn:
        saved += 2 * m * d * act + 2 * b * p.keys * d * act + b * h * p.tokens * 4  # q, out, K, V, logsumexp
    saved += lora_inputs(m, d, ["attn1.to_out.0"], shared_already_saved=True)  # its input is the attention output
    gate = attn or "attn1.to_out.0" in targets
    grad = grad_in or gate
    # 2. cross-attention
    if grad:
        saved += m * d * 4 + 2 * m * 4 + (2 * d * 4 if shape.cross_attn_norm and prec.weight != 4 else 0)
    cq, ck, cv, co = "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"
    saved += lora_inputs(m, d, [cq]) + rank_outputs(m, [cq, co]) + rank_outputs(t, [ck, cv])
    if prec.lora_copy is not None:
        saved += lora_inputs(t, d, [ck, cv])  # the text embeddings, copied by each module (fp32: once per forward)
    q = grad or cq in targets
    saved += q * (m * d * 4 + m * 4) + (ck in targets) * (t * d * 4 + t * 4)
    attn = q or ck in targets or cv in targets
    if attn:
        saved += 2 * m * d * act + 2 * t * d * act + b * h * p.tokens * 4
    saved += lora_inputs(m, d, [co], shared_already_saved=True)
    grad = grad or attn or co in targets
    # 3. feed-forward
    if grad:
        saved += m * d * 4 + 2 * m * 4 + b * frames * d * 4  # norm3 and 1 + c_scale
    saved += lora_inputs(m, d, ["ffn.net.0.proj"]) + rank_outputs(m, ["ffn.net.0.proj", "ffn.net.2"])
    hidden = grad or "ffn.net.0.proj" in targets
    if hidden:
        saved += m * f * act  # GELU input
    saved += lora_inputs(m, f, ["ffn.net.2"])  # GELU output, kept only by the LoRA of ffn.net.2
    out = grad or hidden or "ffn.net.2" in targets
    if gate or out:
        saved += b * frames * 6 * d * 4  # the block's modulation, kept (once) by the gates
    return saved, out


@dataclass(frozen=True)
class ActivationEstimate:
    r"""
    Bytes kept for the backward of one trained denoising step (the update runs one backward per step, so one step's
    activations are alive at a time), and the largest extra bytes alive while it runs backward.

    Args:
        saved (`int`): kept by autograd after the forward and the loss: everything the backward needs.
        backward_workspace (`int`): gradients alive at the worst moment of the backward, beyond `saved` (with
            checkpointing: one block's recomputed activations too).
    """

    saved: int
    backward_workspace: int


def activation_bytes(
    shape: TransformerShape,
    b: int,
    p: _Pass,
    lora: _LoRALayout,
    r: int,
    prec: _Precision,
    checkpointing: bool,
    loss_candidates: int,
    chunk_elements: int,
) -> ActivationEstimate:
    """
    The update's activation memory for a policy forward of `b` videos' chunks and the loss over `loss_candidates`
    candidates of `chunk_elements` latent elements each (see [`ActivationEstimate`]).
    """
    d, f = shape.dim, shape.ffn_dim
    m, t = b * p.tokens, b * p.text
    act = prec.act
    per_block, grad = [], False
    for layer in range(shape.num_layers):
        saved, grad = _saved_block(shape, b, p, lora.blocks[layer], r, prec, grad)
        per_block.append(saved)
    # outside the blocks: the rotary tables (3 per-video [N, head_dim] fp32 tensors), the text embeddings kept once by
    # float32 LoRA modules on the cross-attention k/v, the output norm, the prediction x0 (fp32) and the loss's
    # candidate differences [b, G, E] (fp32), and the autocast copies of LoRA factors
    outer = 3 * p.tokens * shape.attention_head_dim * 4
    if prec.lora_copy is None and any(("attn2.to_k" in blk or "attn2.to_v" in blk) for blk in lora.blocks):
        outer += t * d * 4
    outer += m * d * 4 + 2 * m * 4 + b * p.frames * d * act  # norm_out and its modulation
    loss_saved = b * chunk_elements * 4 + b * loss_candidates * chunk_elements * 4  # x0 and the loss's differences
    outer += loss_saved
    if prec.autocast:
        outer += lora.num_parameters(shape, r) * 2
    # backward: the gradients alive at its worst moment, either at the start (the loss's backward: four more tensors
    # of the size of its candidate differences) or in a block: the self-attention's dK and dV over every attended key
    # (plus the fp32 key path's gradient under autocast) with dQ and dOut, or the feed-forward's two [m, ffn]
    # gradients (three with a LoRA on ffn.net.2); plus the residual stream's gradient (the loss's tensors are freed
    # by then)
    loss_ws = 4 * b * loss_candidates * chunk_elements * 4
    attn_ws = 2 * b * p.keys * d * act + (b * p.keys * d * 4 if prec.autocast else 0) + 2 * m * d * act
    ffn_ws = (2 + any("ffn.net.2" in blk for blk in lora.blocks)) * m * f * act
    block_ws = max(attn_ws, ffn_ws) + m * d * 4
    if not checkpointing:
        return ActivationEstimate(sum(per_block) + outer, max(block_ws - loss_saved, loss_ws))
    # non-reentrant checkpointing keeps each block's input (the residual stream) and the shared text embeddings and
    # timestep projection; during the backward one block is recomputed with its full activations (in float32 its
    # norm1 input is the kept block input itself)
    kept = shape.num_layers * m * d * act + t * d * act + b * p.frames * 6 * d * act
    recomputed = max(per_block) - (m * d * 4 if prec.weight == 4 and not prec.autocast else 0)
    return ActivationEstimate(kept + outer, max(recomputed + block_ws - loss_saved, loss_ws))


def forward_workspace(
    shape: TransformerShape,
    b: int,
    p: _Pass,
    lora: _LoRALayout,
    prec: _Precision,
    context_copy: bool = True,
    whole_batch: int | None = None,
) -> int:
    """
    Peak bytes of one forward without autograd (a rollout or reference pass) of `b` videos' chunks, beyond the KV
    cache: the text embeddings, the block's input (the forward keeps it while the block runs) and its residual stream,
    plus the largest stage of the block:

    - feed-forward (its modulated input and an fp32 normalisation temporary, then the largest of: the `[m, ffn]`
      projection, with a LoRA its scaled update and their sum (and an upcast copy of the projection when the two
      dtypes differ); the projection and its GELU; the GELU output and the
      output projection, with a LoRA on `ffn.net.2` the copies peft and autocast make of its input);
    - self-attention (input, q, k, v, two fp32 RMSNorm and two rotary temporaries), and with `context_copy` the keys
      and values it attends, gathered into one tensor each (a fork reads its prefix and its own chunks; without
      autograd a cache without a prefix attends to a slice of its buffer instead);
    - with `whole_batch` (a sub-batch of a batch of that many videos), the patch embedding computed for the whole
      batch and the sub-batch's copy of it.

    A LoRA module copies its input to its own dtype (fp32) when the base is 16-bit, and autocast copies that to bf16.
    """
    d, f = shape.dim, shape.ffn_dim
    m, t = b * p.tokens, b * p.text
    act, lo = prec.act, prec.lora_out
    copies = (4 if prec.weight != 4 else 0) + (2 if prec.autocast else 0)  # bytes per input element
    f0 = any("ffn.net.0.proj" in blk for blk in lora.blocks)
    f2 = any("ffn.net.2" in blk for blk in lora.blocks)
    # base output, the LoRA's scaled update and their sum (mixed dtypes: plus the base output upcast for the sum)
    update = m * f * (lo + max(act, lo) + (max(act, lo) if act != lo else 0))
    proj = m * f * act + ((m * d * copies + update) if f0 else 0)
    gelu = 2 * m * f * act
    out = m * f * act + m * d * act + (m * f * copies if f2 else 0)
    ffn = m * d * act + m * d * 4 + max(proj, gelu, out)
    attn = 4 * m * d * act + 2 * m * d * 4 + 2 * m * d * act + m * d * copies
    attn += 2 * b * p.keys * d * act if context_copy else 0
    norm = 3 * m * d * 4
    patches = (whole_batch * p.tokens * d * act + m * d * act) if whole_batch else 0
    return t * d * act + 2 * m * d * act + max(ffn, attn, norm, patches)


# ---------------------------------------------------------------------------------------------------- the plan
def format_bytes(n: float) -> str:
    """`n` bytes in GiB, or MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.2f} MiB"


def format_flops(n: float) -> str:
    """`n` FLOP in TFLOP, or GFLOP below one TFLOP."""
    if n == 0:
        return "0"
    return f"{n / 1e12:.2f} TFLOP" if abs(n) >= 1e12 else f"{n / 1e9:.3f} GFLOP"


def _format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _format_seconds(s: float) -> str:
    return f"{s:.2f}" if s >= 0.01 else f"{s:.2e}"


@dataclass
class PhaseCost:
    r"""
    The transformer work of one phase of one iteration, per process.

    Args:
        name (`str`): `"prefix"`, `"branches"`, `"update"` or `"reference"`.
        chunk_forwards (`float`): transformer passes counted in chunk-videos (a call on `n` chunks counts `n`); for
            `"update"` each is a forward and its backward. An expectation over the pivot when it is uniform.
        forward_flops, backward_flops (`float`): matmul FLOPs.
        seconds (`float`): at the plan's MFU against the GPU's peak.
    """

    name: str
    chunk_forwards: float
    forward_flops: float
    backward_flops: float = 0.0
    seconds: float = 0.0

    @property
    def flops(self) -> float:
        return self.forward_flops + self.backward_flops


@dataclass
class MemoryItem:
    r"""
    Bytes of one thing on the device. `phase` says when it is alive: `"persistent"` (the whole run), `"kept"` (made by
    the rollout, alive during the update), `"rollout"` (during the forward of the rollout's last chunk), `"rollout
    end"` (when `sample_group` finishes the group), `"decode"` (the decoded videos) or `"update"` (the inner updates).
    The items of one phase are alive together; the peak takes the largest phase.
    """

    name: str
    bytes: int
    phase: str


@dataclass
class Plan:
    r"""
    The predicted cost of one AR-CoPO iteration (one rollout and `num_iterations` inner updates) on one process.

    Args:
        settings ([`RunSettings`]), transformer ([`TransformerShape`]), video ([`VideoShape`]), gpu ([`GPUSpec`]).
        mfu (`float`): the assumed model FLOPs utilisation.
        pivot (`int` or `None`): the fork point costed (`None`: expectation over a uniform pivot).
        memory_pivot (`int`): the pivot whose memory is reported (the worst one when the pivot is uniform).
        phases (`list[PhaseCost]`).
        memory (`list[MemoryItem]`).
        activations (`dict[bool, ActivationEstimate]`): with (`True`) and without (`False`) gradient checkpointing.
        peak_bytes (`dict[bool, int]`): the process's predicted peak, with and without gradient checkpointing.
        parameters (`dict[str, int]`): transformer, LoRA, text encoder, VAE.
        warnings (`list[str]`): e.g. a peak above the GPU's memory.
        branch_cache_bytes (`int`): the branches' KV cache of one forward at its largest over the pivots (the
            earliest for `full`; the same at every pivot but the last for `rolling` and `recompute`).
    """

    settings: RunSettings
    transformer: TransformerShape
    video: VideoShape
    gpu: GPUSpec
    mfu: float
    pivot: int | None
    memory_pivot: int
    phases: list[PhaseCost]
    memory: list[MemoryItem]
    activations: dict[bool, ActivationEstimate]
    peak_bytes: dict[bool, int]
    parameters: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    branch_cache_bytes: int = 0

    # -------------------------------------------------------------- derived numbers
    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def peak_memory_bytes(self) -> int:
        """The peak with the settings' gradient checkpointing."""
        return self.peak_bytes[self.settings.gradient_checkpointing]

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.gpu.memory_bytes

    def phase(self, name: str) -> PhaseCost:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"No phase {name!r}; the phases are {[p.name for p in self.phases]}.")

    def memory_by_phase(self, phase: str) -> int:
        return sum(item.bytes for item in self.memory if item.phase == phase)

    def rollout_peak_bytes(self, decode: bool = True) -> int:
        """
        The rollout's peak above the persistent memory: what it keeps for the update plus its largest moment (the
        forward of the last chunk, the end of `sample_group`, or, with `decode`, the decoded videos).
        """
        phases = ("rollout", "rollout end", "decode") if decode else ("rollout", "rollout end")
        return self.memory_by_phase("kept") + max(self.memory_by_phase(p) for p in phases)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every number."""
        out = {
            "settings": asdict(self.settings),
            "transformer": asdict(self.transformer),
            "video": asdict(self.video),
            "gpu": asdict(self.gpu),
            "mfu": self.mfu,
            "pivot": self.pivot,
            "memory_pivot": self.memory_pivot,
            "phases": [{**asdict(p), "flops": p.flops} for p in self.phases],
            "memory": [asdict(m) for m in self.memory],
            "activations": {
                ("with" if k else "without") + "_checkpointing": asdict(v) for k, v in self.activations.items()
            },
            "peak_bytes": {("with" if k else "without") + "_checkpointing": v for k, v in self.peak_bytes.items()},
            "peak_memory_bytes": self.peak_memory_bytes,
            "fits": self.fits,
            "flops": self.flops,
            "seconds": self.seconds,
            "parameters": self.parameters,
            "warnings": list(self.warnings),
        }
        return json.loads(json.dumps(out, default=list))

    def summary(self, per_run: bool = True) -> str:
        """
        The title and settings of the plan; `per_run=False` leaves out the GPU, checkpointing and optimizer (a table
        whose rows vary them follows).
        """
        s, v, t = self.settings, self.video, self.transformer
        tpf = v.tokens_per_frame(t)
        pivot = "uniform (expectation)" if self.pivot is None else str(self.pivot)
        precision = s.torch_dtype + (f" + {s.mixed_precision} autocast" if s.mixed_precision else "")
        title = f"{self.gpu.name}, MFU {self.mfu:.0%}" if per_run else f"MFU {self.mfu:.0%}"
        lines = [
            f"## AR-CoPO iteration plan: {title}",
            "",
            (
                f"- transformer: {t.num_layers} layers, {t.num_attention_heads}x{t.attention_head_dim} heads, FFN "
                f"{t.ffn_dim}, patch {tuple(t.patch_size)}; {_format_count(self.parameters['transformer'])} "
                f"parameters ({precision})"
            ),
            (
                f"- video: {v.height}x{v.width}x{v.num_frames} -> latent {v.latent_frames}x{v.latent_height}x"
                f"{v.latent_width}, {v.num_chunks} chunks of {v.num_frames_per_chunk} "
                f"({v.num_frames_per_chunk * tpf} tokens), {v.max_sequence_length} text tokens; {v.describe_cache()}"
            ),
            (
                f"- G={s.num_generations}, anchors={s.num_anchors}, {s.num_denoising_steps} denoising steps "
                f"({len(s.trained_steps)} trained), num_iterations={s.num_iterations}, "
                f"{s.per_device_train_batch_size} prompt(s) per process, {s.num_processes} process(es)"
                + (", groups split across them" if s.split_groups_across_processes else "")
                + (", the transformer sharded over them (FSDP)" if s.fsdp else "")
                + f", pivot {pivot}"
            ),
            f"- LoRA r={s.lora_r} on {self._targets()} ({_format_count(self.parameters['lora'])} parameters)"
            + (
                f"; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; optimizer {s.optim}"
                if per_run
                else ""
            )
            + (f"; beta={s.beta}" if s.beta > 0 else ""),
        ]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A report: the settings, FLOPs and seconds by phase, memory by item and the peaks, and warnings."""
        s = self.settings
        lines = [
            self.summary(),
            "| phase | chunk passes | forward | backward | seconds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for p in self.phases:
            lines.append(
                f"| {p.name} | {p.chunk_forwards:.1f} | {format_flops(p.forward_flops)} | "
                f"{format_flops(p.backward_flops)} | {_format_seconds(p.seconds)} |"
            )
        total = self.flops * s.num_processes
        lines.append(
            f"| **iteration** | | {format_flops(sum(p.forward_flops for p in self.phases))} | "
            f"{format_flops(sum(p.backward_flops for p in self.phases))} | **{_format_seconds(self.seconds)}** |"
        )
        if s.num_processes > 1:
            lines += ["", f"All {s.num_processes} processes together: {format_flops(total)} per iteration."]
        lines += [
            "",
            f"Memory per process at pivot {self.memory_pivot}, the one with the highest peak:",
            "",
            "| item | phase | bytes |",
            "| --- | --- | ---: |",
        ]
        lines += [f"| {m.name} | {m.phase} | {format_bytes(m.bytes)} |" for m in self.memory]
        for ckpt in (False, True):
            a = self.activations[ckpt]
            mark = " (selected)" if ckpt == s.gradient_checkpointing else ""
            lines.append(
                f"| **peak, checkpointing {'on' if ckpt else 'off'}{mark}** (activations {format_bytes(a.saved)} + "
                f"backward {format_bytes(a.backward_workspace)}) | | **{format_bytes(self.peak_bytes[ckpt])}** |"
            )
        lines.append(f"| GPU memory | | {format_bytes(self.gpu.memory_bytes)} |")
        if self.warnings:
            lines += ["", *[f"> WARNING: {w}" for w in self.warnings]]
        return "\n".join(lines) + "\n"

    def _targets(self) -> str:
        t = self.settings.lora_target_modules
        return t if isinstance(t, str) else ", ".join(t)


def optimizer_bytes(tensor_sizes: Sequence[int], eight_bit: bool) -> int:
    """
    AdamW's two states for fp32 parameters of these sizes: 8 bytes per parameter; or, with bitsandbytes' 8-bit AdamW,
    1 byte per state and an fp32 absmax per block of 256 for tensors of at least 4096 elements (smaller ones keep
    fp32 states; the shared 256-entry quantisation maps are not counted).
    """
    if not eight_bit:
        return 8 * sum(tensor_sizes)
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in tensor_sizes)


_VIDEO_KEYS = ("height", "width", "num_frames", "num_frames_per_chunk", "max_sequence_length")
_CACHE_KEYS = ("cache_policy", "local_attn_frames", "sink_frames")  # a pipeline config's names
#: What `plan(..., **overrides)` accepts: the `RunSettings` fields, the config names they are read from, the video.
_OVERRIDES = {
    *RunSettings.__dataclass_fields__,
    "bf16",
    "fp16",
    "activation_checkpointing",
    "denoising_sigmas",
    *_VIDEO_KEYS,
    *_CACHE_KEYS,
}


def plan(
    config: Mapping | Any,
    transformer_config: Mapping | Any | str = "self-forcing-1.3b",
    video: VideoShape | None = None,
    *,
    gpu: str | GPUSpec = "h100",
    mfu: float = 0.35,
    num_processes: int | None = None,
    text_encoder_parameters: int | None = None,
    vae_parameters: int | None = None,
    transformer_parameters_count: int | None = None,
    **overrides,
) -> Plan:
    r"""
    Predict one AR-CoPO iteration (one rollout and `num_iterations` inner updates) per process.

    Args:
        config (`dict` or [`ARCoPOConfig`]): the run (a YAML of `examples/train_arcopo.py` as a dict works; see
            [`RunSettings.from_config`]). Its `height`, `width`, `num_frames`, `num_frames_per_chunk` and
            `max_sequence_length` override the video's, and its `cache_policy`, `local_attn_frames` and
            `sink_frames` the generator's cache policy.
        transformer_config (`dict`, a diffusers config, or a preset name such as `"self-forcing-1.3b"`).
        video ([`VideoShape`], *optional*): the pipeline's default video; required unless a preset is named.
        gpu (`str` or [`GPUSpec`]): a key of `GPUS` (`"h100"`, `"h200"`, `"a100"`, `"l40s"`, ...).
        mfu (`float`): assumed model FLOPs utilisation (fraction of the dense peak: BF16 for 16-bit compute, TF32 for
            float32).
        num_processes (`int`, *optional*): data-parallel processes (the plan is per process; totals scale with it).
        text_encoder_parameters, vae_parameters (`int`, *optional*): frozen components on the device (default: the
            preset's, else 0).
        transformer_parameters_count (`int`, *optional*): skip the meta-device count (e.g. a model you already have).
        overrides: [`RunSettings`] fields (e.g. `num_generations=8`, `gradient_checkpointing=True`), config names
            (`bf16`, `activation_checkpointing`, `denoising_sigmas`), the video's (`height`, `num_frames`, ...) or the
            cache policy's (`cache_policy`, `local_attn_frames`, `sink_frames`).

    Returns:
        [`Plan`]
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"`mfu={mfu}` must be in (0, 1], e.g. 0.35.")
    preset = None
    if isinstance(transformer_config, str):
        preset = get_preset(transformer_config)
        transformer_config = preset.transformer
    shape = TransformerShape.from_config(transformer_config)
    if video is None:
        if preset is None:
            raise ValueError("Pass `video=VideoShape(...)` (e.g. `VideoShape.from_pipeline(pipe)`) or a preset name.")
        video = preset.video
    unknown = set(overrides) - _OVERRIDES
    if unknown:
        raise TypeError(f"Unknown settings {sorted(unknown)}; the settings a plan takes are {sorted(_OVERRIDES)}.")

    def get(key):
        if overrides.get(key) is not None:
            return overrides[key]
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    video = replace(
        video,
        **{k: int(get(k)) for k in _VIDEO_KEYS if get(k)},
        **{k: get(k) if k == "cache_policy" else int(get(k)) for k in _CACHE_KEYS if get(k) is not None},
    )
    overrides = {k: v for k, v in overrides.items() if k not in _VIDEO_KEYS + _CACHE_KEYS}
    defaults = {}
    if preset is not None:
        if get("denoising_sigmas") is None:
            defaults["num_denoising_steps"] = preset.num_denoising_steps
        if get("sampler") is None:
            defaults["sampler"] = preset.sampler
    settings = RunSettings.from_config(config, num_processes=num_processes, **{**defaults, **overrides})
    if settings.pivot_chunk is not None and settings.pivot_chunk >= video.num_chunks:
        raise ValueError(
            f"`pivot_chunk={settings.pivot_chunk}` but the video has {video.num_chunks} chunks; use an index in "
            f"[0, {video.num_chunks}) or None (uniform)."
        )
    gpu = get_gpu(gpu)
    params = {
        "transformer": transformer_parameters_count or wan_transformer_parameters(shape),  # (= a meta build, tested)
        "text_encoder": text_encoder_parameters
        if text_encoder_parameters is not None
        else (preset.text_encoder_parameters if preset else 0),
        "vae": vae_parameters if vae_parameters is not None else (preset.vae_parameters if preset else 0),
    }
    lora = _LoRALayout.build(shape, settings.lora_target_modules)
    params["lora"] = lora.num_parameters(shape, settings.lora_r)
    return _make_plan(settings, shape, video, gpu, mfu, lora, params)


def _make_plan(
    s: RunSettings, shape: TransformerShape, video: VideoShape, gpu: GPUSpec, mfu: float, lora: _LoRALayout, params
) -> Plan:
    prec = _Precision(weight=DTYPE_BYTES[s.torch_dtype], autocast=s.mixed_precision is not None)
    tpf = video.tokens_per_frame(shape)
    num_chunks, steps, r = video.num_chunks, s.num_denoising_steps, s.lora_r
    b, g_all = s.per_device_train_batch_size, s.num_generations
    g, k = s.branches_per_process, s.anchors_per_process  # this process's branches and anchors of each group
    m, ka = s.branches_per_forward, s.anchors_per_forward  # videos per forward: rollout branches, update anchors
    text, frames = video.max_sequence_length, video.num_frames_per_chunk

    sub_batched = s.rollout_batch_size is not None or s.split_groups_across_processes
    scale = b * g_all / m if sub_batched else 1.0  # a sub-batch embeds for the whole batch: per branch

    def frames_pass(num_frames: int, attended: int, embed_scale: float = 1.0) -> _Pass:
        return _Pass(num_frames * tpf, attended * tpf, text, num_frames, embed_scale)

    def chunk_pass(c: int, embed_scale: float = 1.0) -> _Pass:
        """A denoising pass of chunk `c` (under a window it attends to fewer keys)."""
        return frames_pass(frames, video.attended_frames(c), embed_scale)

    @functools.cache  # under a window the passes of most chunks are the same
    def fwd(p: _Pass, adapter: bool = True) -> float:
        return forward_flops(shape, p, lora if adapter else None, r)

    # per chunk: one denoising pass, and the forwards that commit it (none for the last chunk)
    commits = [video.commit_forwards(c) for c in range(num_chunks - 1)]

    def per_chunk(embed_scale: float) -> tuple[list[float], list[float]]:
        denoise = [fwd(chunk_pass(c, embed_scale)) for c in range(num_chunks)]
        commit = [sum(fwd(frames_pass(f, a, embed_scale)) for f, a in forwards) for forwards in commits]
        return denoise, commit

    denoise_fwd, commit_fwd = per_chunk(1.0)
    branch_denoise_fwd, branch_commit_fwd = per_chunk(scale) if scale != 1.0 else (denoise_fwd, commit_fwd)
    commit_calls = [len(forwards) for forwards in commits]  # 1, or the context's blocks for "recompute"

    def costs(pivot: int) -> list[PhaseCost]:
        # the prefix denoises and commits chunks < pivot; each branch denoises chunks >= pivot and commits all but the
        # video's last
        prefix = PhaseCost(
            "prefix",
            b * (pivot * steps + sum(commit_calls[:pivot])),
            b * (steps * sum(denoise_fwd[:pivot]) + sum(commit_fwd[:pivot])),
        )
        branches = PhaseCost(
            "branches",
            b * g * ((num_chunks - pivot) * steps + sum(commit_calls[pivot:])),
            b * g * (steps * sum(branch_denoise_fwd[pivot:]) + sum(branch_commit_fwd[pivot:])),
        )
        trained = s.num_iterations * b * k * len(s.trained_steps)
        update = chunk_pass(pivot)  # the pivot chunk against the prefix's cache: its window, or its context
        bwd = backward_flops(shape, update, lora, r, s.gradient_checkpointing)
        phases = [prefix, branches, PhaseCost("update", trained, trained * fwd(update), trained * bwd)]
        if s.beta > 0:
            phases.append(PhaseCost("reference", trained, trained * fwd(update, False)))
        return phases

    pivots = [s.pivot_chunk] if s.pivot_chunk is not None else list(range(num_chunks))
    per_pivot = [costs(p) for p in pivots]
    phases = [
        PhaseCost(
            ph.name,
            sum(c[i].chunk_forwards for c in per_pivot) / len(pivots),
            sum(c[i].forward_flops for c in per_pivot) / len(pivots),
            sum(c[i].backward_flops for c in per_pivot) / len(pivots),
        )
        for i, ph in enumerate(per_pivot[0])
    ]
    peak = (gpu.bf16_flops if prec.act == 2 else gpu.tf32_flops) * mfu
    for ph in phases:
        ph.seconds = ph.flops / peak

    # ---- memory, at every pivot (the prefix grows with it, the branches' cache shrinks): the peak is the worst
    chunk = shape.in_channels * frames * video.latent_height * video.latent_width  # latent elements of one chunk
    latent = chunk * num_chunks  # fp32 noise and latents: 4 bytes each
    cache_per_frame = 2 * shape.num_layers * tpf * shape.dim * prec.weight  # keys and values of one video's frame
    context_latent = chunk // frames * 4  # a recompute cache's clean latents: fp32 bytes per frame
    embeds = text * shape.text_dim * prec.weight
    renoise = num_chunks * (steps - 1) * chunk if s.sampler == "consistency" else 0
    pixels = video.num_frames * 3 * video.height * video.width * 4  # decoded video, fp32
    if s.reward_window_chunks is None:
        kept_pixels = pixels  # every decoded video is kept whole
    else:  # the window's frames of each video (about its share of the chunks), and one decode call's whole videos
        window = min(num_chunks, s.reward_window_chunks + s.reward_context_chunks)
        part = s.decode_batch_size or b * g
        kept_pixels = pixels * window // num_chunks + pixels * min(part, b * g) // (b * g)
    policy = video.cache_policy
    text_encoder = "VAE weights (text encoder offloaded)" if s.offload_text_encoder else "text encoder and VAE weights"
    frozen_bytes = ((0 if s.offload_text_encoder else params["text_encoder"]) + params["vae"]) * prec.weight
    optim = optimizer_bytes(lora.tensor_sizes(shape, r), s.uses_8bit_optimizer)
    optim_name = "optimizer state" + (" (8-bit)" if s.uses_8bit_optimizer else " (fp32)")
    if s.fsdp:
        # FSDP2 over the blocks: every process keeps a 1/N shard of every parameter; the parameters outside the blocks
        # (the root's) stay gathered through the forward and backward, and a block is gathered while it runs, the
        # next one prefetched; each block's LoRA gradients are whole until they are reduce-scattered
        shards = s.num_processes
        outer = max(params["transformer"] - shape.num_layers * wan_block_parameters(shape), 0)
        lora_outer = sum(r * (i + o) for name, i, o, _ in _outer_linears(shape) if name in lora.outer)
        base_bytes = (-(-params["transformer"] // shards) + outer + 2 * wan_block_parameters(shape)) * prec.weight
        lora_bytes = (-(-params["lora"] // shards) + lora_outer + 2 * lora.block_parameters(shape, r)) * 4
        optim = -(-optim // shards)
        fsdp = f"FSDP: a 1/{shards} shard, the parameters outside the blocks and 2 blocks gathered"
        names = (
            f"transformer weights ({fsdp})",
            f"LoRA parameters (fp32; {fsdp})",
            f"{optim_name}, a 1/{shards} shard",
            f"LoRA gradients (fp32; {fsdp})",
        )
    else:
        base_bytes, lora_bytes = params["transformer"] * prec.weight, params["lora"] * 4
        names = ("transformer weights", "LoRA parameters (fp32)", optim_name, "LoRA gradients (fp32)")
    persistent = [
        MemoryItem(names[0], base_bytes, "persistent"),
        MemoryItem(text_encoder, frozen_bytes, "persistent"),
        MemoryItem(names[1], lora_bytes, "persistent"),
        MemoryItem(names[2], optim, "persistent"),
    ]
    loss_candidates = g_all if s.loss_type == "arcopo" else 1
    ref = s.beta > 0

    def cache_items(p: int, sub: str) -> list[MemoryItem]:
        """The prefix's cache (kept for the update) and the branches' of one forward, by the cache policy."""
        prefix, branch = video.prefix_cache_frames(p), video.branch_cache_frames(p)
        if policy == "full":
            return [
                MemoryItem(f"KV cache: prefix (B videos, {p} chunks)", b * prefix * cache_per_frame, "kept"),
                MemoryItem(
                    f"KV cache: branches ({m} videos{sub}, {num_chunks - 1 - p} chunks after the prefix)",
                    m * branch * cache_per_frame,
                    "rollout",
                ),
            ]
        if policy == "rolling":
            return [
                MemoryItem(
                    f"KV cache: prefix (B videos, rolling: {prefix} frames)", b * prefix * cache_per_frame, "kept"
                ),
                MemoryItem(
                    f"KV cache: branches ({m} videos{sub}, rolling: {branch} frames each)",
                    m * branch * cache_per_frame,
                    "rollout",
                ),
            ]
        # recompute: the context's keys and values and its clean latents; a branch's own after its first commit (the
        # forked latents, a copy of the prefix's, until then); each commit builds the new context next to the old one
        latents = branch if branch else prefix
        return [
            MemoryItem(
                f"KV cache: prefix (B videos, recompute: {prefix} context frames and their fp32 latents)",
                b * prefix * (cache_per_frame + context_latent),
                "kept",
            ),
            MemoryItem(
                f"KV cache: branches ({m} videos{sub}, recompute: {branch} context frames and their fp32 latents)",
                m * (branch * cache_per_frame + latents * context_latent),
                "rollout",
            ),
            MemoryItem(
                f"KV cache rebuilt by a commit next to the old one (recompute: {m} videos, {branch} frames)",
                m * branch * cache_per_frame,
                "rollout",
            ),
        ]

    def memory_at(p: int) -> tuple[list[MemoryItem], dict[bool, ActivationEstimate], dict[bool, int]]:
        """The items alive at pivot `p`, the activations, and the peak with and without checkpointing."""
        sub = f" ({-(-g // m)} sub-batches per prompt)" if s.rollout_batch_size is not None and m < g else ""
        roll_ws = forward_workspace(shape, m, chunk_pass(num_chunks - 1), lora, prec, whole_batch=round(scale * m))
        prefix_cache, *branch_cache = cache_items(p, sub)
        items = [
            prefix_cache,
            MemoryItem(
                "trajectories: states and x̂0 of the pivot chunk (fp32)", 2 * b * g_all * steps * chunk * 4, "kept"
            ),
            MemoryItem("prompt embeddings", b * embeds, "kept"),
            *branch_cache,
            MemoryItem("rollout noise (fp32)", (b + m) * (latent + renoise) * 4, "rollout"),
            MemoryItem("branch prompt embeddings", m * embeds, "rollout"),
            MemoryItem(
                "finished chunks of every branch and the current chunk's state (fp32)",
                b * g * (num_chunks - p) * chunk * 4 + m * 4 * chunk * 4,
                "rollout",
            ),
            MemoryItem(f"forward workspace (rollout, batch {m})", roll_ws, "rollout"),
            MemoryItem(  # beyond the kept trajectories: each sub-batch's outputs, their concatenations
                "end of the rollout: noise, finished chunks, the latents and the trajectories concatenated (fp32)",
                b * (latent + renoise) * 4 + b * g * ((num_chunks - p) + num_chunks + 2 * steps) * chunk * 4,
                "rollout end",
            ),
            MemoryItem(
                "decoded videos and their latents (fp32; VAE activations not included)"
                + (
                    " (the reward window's frames, and one decode call's whole videos)"
                    if kept_pixels != pixels
                    else ""
                ),
                b * g * (kept_pixels + latent * 4),
                "decode",
            ),
        ]
        acts = {
            ckpt: activation_bytes(shape, b * ka, chunk_pass(p), lora, r, prec, ckpt, loss_candidates, chunk)
            for ckpt in (False, True)
        }
        ref_ws = forward_workspace(shape, b * ka, chunk_pass(p), lora, prec) if ref else 0
        update_fixed = [
            MemoryItem(
                f"anchor states and embeddings ({b * ka} per forward)", b * ka * (chunk * 4 + embeds), "update"
            ),
            MemoryItem(names[3], lora_bytes, "update"),
        ]
        fixed = sum(i.bytes for i in update_fixed)
        rollout = max(sum(i.bytes for i in items if i.phase == ph) for ph in ("rollout", "rollout end", "decode"))
        kept = sum(i.bytes for i in items if i.phase == "kept")
        base = sum(i.bytes for i in persistent)
        peaks = {
            ckpt: base + kept + max(rollout, fixed + a.saved + max(a.backward_workspace, ref_ws))
            for ckpt, a in acts.items()
        }
        sel = acts[s.gradient_checkpointing]
        items += update_fixed + [
            MemoryItem(f"activations of one trained step ({b * ka} anchors per forward)", sel.saved, "update"),
            MemoryItem("backward workspace", max(sel.backward_workspace, ref_ws), "update"),
        ]
        return items, acts, peaks

    at = {p: memory_at(p) for p in pivots}
    peak_bytes = {ckpt: max(at[p][2][ckpt] for p in pivots) for ckpt in (False, True)}
    mp = max(pivots, key=lambda p: (at[p][2][s.gradient_checkpointing], p))  # the worst pivot (the latest of ties)
    items, acts, _ = at[mp]
    memory = persistent + items
    plan_ = Plan(
        settings=s, transformer=shape, video=video, gpu=gpu, mfu=mfu, pivot=s.pivot_chunk, memory_pivot=mp,
        phases=phases, memory=memory, activations=acts, peak_bytes=peak_bytes, parameters=dict(params),
        branch_cache_bytes=max(cache_items(p, "")[1].bytes for p in pivots),
    )  # fmt: skip
    if not plan_.fits:
        rollout = plan_.rollout_peak_bytes()
        update = plan_.memory_by_phase("kept") + plan_.memory_by_phase("update")
        phase = "update" if update > rollout else "rollout"
        largest = max((i for i in memory if i.phase in (phase, "persistent", "kept")), key=lambda i: i.bytes)
        fixes = []
        if phase == "update" and not s.gradient_checkpointing and peak_bytes[True] < peak_bytes[False]:
            fixes.append(f"turn on gradient checkpointing (peak {format_bytes(peak_bytes[True])})")
        if phase == "update" and ka > 1:
            fixes.append("lower anchor_batch_size (the activations grow with the anchors per forward)")
        decode = plan_.memory_by_phase("decode")
        if phase == "rollout" and decode >= max(plan_.memory_by_phase(p) for p in ("rollout", "rollout end")):
            fixes.append(
                f"lower num_generations or split_groups_across_processes (the {b * g} decoded videos, "
                f"{format_bytes(decode)}, are on the device together)"
            )
        elif phase == "rollout" and m > 1:
            fixes.append(
                "set or lower rollout_batch_size (the branches' KV cache grows with the branches per forward)"
            )
        if not s.offload_text_encoder and params["text_encoder"]:
            fixes.append(f"offload_text_encoder ({format_bytes(params['text_encoder'] * prec.weight)})")
        if s.per_device_train_batch_size > 1:
            fixes.append("lower per_device_train_batch_size")
        fixes.append("use a GPU with more memory (`trl-arcopo plan --fit` finds the fastest setting that fits)")
        plan_.warnings.append(
            f"the predicted peak ({format_bytes(plan_.peak_memory_bytes)}, in the {phase} at pivot {mp}) exceeds the "
            f"{gpu.name}'s {format_bytes(gpu.memory_bytes)}; the largest item is '{largest.name}' "
            f"({format_bytes(largest.bytes)}). To fit: {'; '.join(fixes)}."
        )
    return plan_


# ---------------------------------------------------------------------------------------------------- configs and pipelines
@dataclass(frozen=True)
class GeneratorSpec:
    r"""
    What the plan needs of a generator: its transformer config, default video, frozen components and schedule.

    Args:
        transformer (`dict`), video ([`VideoShape`]), text_encoder_parameters, vae_parameters (`int`),
        transformer_parameters (`int`, *optional*): known count (else a meta-device build counts them),
        num_denoising_steps (`int`), sampler (`str`): the pipeline's defaults.
    """

    transformer: dict
    video: VideoShape
    text_encoder_parameters: int = 0
    vae_parameters: int = 0
    transformer_parameters: int | None = None
    num_denoising_steps: int = SELF_FORCING_NUM_STEPS
    sampler: str = "consistency"

    @classmethod
    def from_preset(cls, name: str) -> GeneratorSpec:
        p = get_preset(name)
        return cls(p.transformer, p.video, p.text_encoder_parameters, p.vae_parameters, None, p.num_denoising_steps,
                   p.sampler)  # fmt: skip

    @classmethod
    def from_pipeline(cls, pipeline) -> GeneratorSpec:
        """From a loaded `SelfForcingPipeline` (counts its modules' parameters)."""

        def count(module):
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        sigmas = getattr(pipeline.config, "default_sigmas", None)
        lora = {n for n, p in pipeline.transformer.named_parameters() if "lora_" in n}
        return cls(
            transformer=dict(pipeline.transformer.config),
            video=VideoShape.from_pipeline(pipeline),
            text_encoder_parameters=count(pipeline.text_encoder),
            vae_parameters=count(pipeline.vae),
            transformer_parameters=sum(p.numel() for n, p in pipeline.transformer.named_parameters() if n not in lora),
            num_denoising_steps=len(sigmas) if sigmas else SELF_FORCING_NUM_STEPS,
            sampler=getattr(pipeline.config, "default_sampler", "consistency"),
        )

    @classmethod
    def from_folder(cls, path: str) -> GeneratorSpec:
        """
        From a `SelfForcingPipeline` folder's JSON configs only (no weights are read): `model_index.json` (the
        defaults and the cache policy), the transformer's and VAE's `config.json`; the text encoder and VAE are counted
        on the meta device.
        """
        index = _read_json(os.path.join(path, "model_index.json"))
        transformer = _read_json(os.path.join(path, "transformer", "config.json"))
        vae_library, vae_class = (index.get("vae") or [None, None])[:2]
        vae_config = _read_json(os.path.join(path, "vae", "config.json")) if vae_class else {}
        wan_vae = vae_class == "AutoencoderKLWan"
        video = VideoShape(
            height=index.get("default_height", 480),
            width=index.get("default_width", 832),
            num_frames=index.get("default_num_frames", 81),
            num_frames_per_chunk=index.get("default_num_frames_per_chunk", 3),
            vae_scale_factor_temporal=vae_config.get("scale_factor_temporal") or (4 if wan_vae else 1),
            vae_scale_factor_spatial=vae_config.get("scale_factor_spatial") or (8 if wan_vae else 1),
            frame_packing=vae_class == "FramePackingAutoencoder",
            max_sequence_length=index.get("default_max_sequence_length", 512),
            cache_policy=index.get("cache_policy", "full"),
            local_attn_frames=index.get("local_attn_frames"),
            sink_frames=index.get("sink_frames", 0),
        )
        sigmas = index.get("default_sigmas")
        return cls(
            transformer=transformer,
            video=video,
            text_encoder_parameters=_count_component(path, "text_encoder", index.get("text_encoder")),
            vae_parameters=_count_component(path, "vae", [vae_library, vae_class]) if vae_class else 0,
            num_denoising_steps=len(sigmas) if sigmas else SELF_FORCING_NUM_STEPS,
            sampler=index.get("default_sampler", "consistency"),
        )

    @classmethod
    def resolve(cls, name_or_path: str | None, preset: str | None = None) -> GeneratorSpec:
        """
        The generator of a YAML's `pipeline_name_or_path` (as `examples/train_arcopo.py` reads it): a `preset`
        wins; then a preset name, `"tiny-random"`, `"moving-shapes"` (the default) or a local pipeline folder.
        """
        if preset is not None:
            return cls.from_preset(preset)
        name = name_or_path or "moving-shapes"
        if name in PRESETS:
            return cls.from_preset(name)
        if name == "tiny-random":
            from .testing_utils import tiny_pipeline

            return cls.from_pipeline(tiny_pipeline())
        if name == "moving-shapes":
            from .shapes.pretrained import PRETRAINED_PATH

            name = PRETRAINED_PATH
        if os.path.isfile(os.path.join(name, "model_index.json")):
            return cls.from_folder(name)
        raise ValueError(
            f"`pipeline_name_or_path={name_or_path!r}` is not a local pipeline folder, so its transformer config is "
            f"unknown without downloading it: pass a preset (one of {sorted(PRESETS)}; `--preset self-forcing-1.3b` "
            "is Self-Forcing's Wan2.1-T2V-1.3B) or a folder made by `trl-arcopo-convert`."
        )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: is this a `SelfForcingPipeline` folder (`save_pretrained`)?")
    with open(path) as f:
        return json.load(f)


def _count_component(path: str, folder: str, entry: Sequence | None) -> int:
    """Parameters of a pipeline component from its config, built on the meta device (0 if it has none)."""
    if not entry or entry[0] is None:
        return 0
    import importlib

    library, class_name = entry[:2]
    cls = getattr(importlib.import_module(library), class_name)
    config_path = os.path.join(path, folder, "config.json")
    if hasattr(cls, "config_class") and cls.config_class is not None:  # transformers
        import torch

        config = cls.config_class.from_json_file(config_path)
        with torch.device("meta"):
            model = cls(config)
        return sum(p.numel() for p in model.parameters())
    return count_parameters(cls, _read_json(config_path))


def load_yaml(path: str) -> dict:
    """The dict of a YAML config of `examples/train_arcopo.py`."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config file at {path!r}; pass a YAML such as examples/configs/self_forcing.yaml.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise TypeError(f"{path} does not hold a mapping of settings (got {type(config).__name__}).")
    return config


def plan_config(
    config: Mapping | Any | None = None,
    generator: GeneratorSpec | str | None = None,
    *,
    gpu: str | GPUSpec = "h100",
    mfu: float = 0.35,
    num_processes: int | None = None,
    **overrides,
) -> Plan:
    """
    [`plan`] for a run config (a dict such as a YAML of `examples/train_arcopo.py`, or an [`ARCoPOConfig`]) on a
    generator: a [`GeneratorSpec`], a preset name, or `None` to resolve the config's `pipeline_name_or_path`.
    """
    config = {} if config is None else config
    if not isinstance(generator, GeneratorSpec):
        name = config.get("pipeline_name_or_path") if isinstance(config, Mapping) else None
        generator = GeneratorSpec.resolve(name, preset=generator)
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    defaults = {}
    if get("denoising_sigmas") is None:
        defaults["num_denoising_steps"] = generator.num_denoising_steps
    if get("sampler") is None:
        defaults["sampler"] = generator.sampler
    return plan(
        config, generator.transformer, generator.video, gpu=gpu, mfu=mfu, num_processes=num_processes,
        text_encoder_parameters=generator.text_encoder_parameters, vae_parameters=generator.vae_parameters,
        transformer_parameters_count=generator.transformer_parameters, **{**defaults, **overrides},
    )  # fmt: skip


def fit(
    config: Mapping | Any | None = None,
    generator: GeneratorSpec | str | None = None,
    *,
    gpu: str | GPUSpec = "h100",
    mfu: float = 0.35,
    num_processes: int | None = None,
    headroom: float = 0.15,
    **overrides,
) -> tuple[Plan | None, list[Plan]]:
    """
    The fastest setting of the memory knobs that fits `gpu`: every combination of gradient checkpointing,
    `rollout_batch_size` (every branch at once, then `ceil(G / k)` for `k = 2, 3, ...`), `anchor_batch_size` and
    `offload_text_encoder` is planned ([`plan_config`]; `overrides` set the other settings); among those whose peak
    leaves `headroom` of the GPU's memory free (the caching allocator reserves 5-15 % above the allocated bytes, and
    the VAE decoder, the reward models and the CUDA context are not in the plan), the one with the fewest seconds,
    then the fewest sub-batches, then the text encoder on the device. Returns `(best or None, every plan tried)`.
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"`headroom={headroom}` must be in [0, 1), e.g. 0.15.")
    config = {} if config is None else config
    get = config.get if isinstance(config, Mapping) else (lambda key: getattr(config, key, None))

    def knob(name, default):
        return overrides.get(name, get(name) if get(name) is not None else default)

    g, k = int(knob("num_generations", 12)), int(knob("num_anchors", 4))
    rollouts = [None] + sorted({-(-g // d) for d in range(2, g + 1)}, reverse=True)
    anchors = [None] + sorted({-(-k // d) for d in range(2, k + 1)}, reverse=True)
    searched = ("gradient_checkpointing", "offload_text_encoder", "rollout_batch_size", "anchor_batch_size")
    overrides = {key: value for key, value in overrides.items() if key not in searched}
    config = dict(config) if isinstance(config, Mapping) else dict(vars(config))  # the searched knobs are the fit's
    for key in (*searched, "activation_checkpointing"):
        config.pop(key, None)

    def candidate(checkpointing: bool, offload: bool, rollout: int | None, anchors_: int | None) -> Plan:
        knobs = dict(gradient_checkpointing=checkpointing, offload_text_encoder=offload, rollout_batch_size=rollout,
                     anchor_batch_size=anchors_)  # fmt: skip
        return plan_config(config, generator, gpu=gpu, mfu=mfu, num_processes=num_processes, **knobs, **overrides)

    plans = [
        candidate(c, o, rb, ab) for c in (False, True) for o in (False, True) for rb in rollouts for ab in anchors
    ]
    fitting = [p for p in plans if p.peak_memory_bytes <= (1 - headroom) * p.gpu.memory_bytes]

    def cost(p: Plan):
        s = p.settings
        return (round(p.seconds, 1), -s.branches_per_forward, -s.anchors_per_forward, s.offload_text_encoder)

    return (min(fitting, key=cost) if fitting else None), plans


def memory_knobs(plan_: Plan) -> str:
    """The memory knobs of a plan, as `--name value` flags of `examples/train_arcopo.py`."""
    s = plan_.settings
    return (
        f"--gradient_checkpointing {str(s.gradient_checkpointing).lower()} --rollout_batch_size "
        f"{s.rollout_batch_size} --anchor_batch_size {s.anchor_batch_size} --offload_text_encoder "
        f"{str(s.offload_text_encoder).lower()}"
    )


def fit_report(best: Plan | None, tried: Sequence[Plan], headroom: float = 0.15) -> str:
    """What [`fit`] found: the setting, its seconds and peak, then its full report; or why nothing fits."""
    gpu = tried[0].gpu
    limit = (1 - headroom) * gpu.memory_bytes
    if best is None:
        closest = min(tried, key=lambda p: p.peak_memory_bytes)
        return (
            f"## No setting fits the {gpu.name} with {headroom:.0%} headroom\n\nOf {len(tried)} settings the smallest "
            "peak is "
            f"{format_bytes(closest.peak_memory_bytes)} (of {format_bytes(gpu.memory_bytes)}), with "
            f"`{memory_knobs(closest)}`. Lower num_generations or per_device_train_batch_size, or use a GPU with more "
            "memory.\n"
        )
    fitting = sum(p.peak_memory_bytes <= limit for p in tried)
    return (
        f"## Fastest setting that fits the {gpu.name} with {headroom:.0%} headroom\n\n`{memory_knobs(best)}`: "
        f"{best.seconds:.1f} s per iteration, peak {format_bytes(best.peak_memory_bytes)} of "
        f"{format_bytes(gpu.memory_bytes)} ({fitting} of {len(tried)} settings fit in {format_bytes(limit)}).\n\n"
        + best.to_markdown()
    )


def grid_table(plans: Sequence[Plan]) -> str:
    """One markdown row per plan: GPU, checkpointing, optimizer, seconds by phase, memory and whether it fits."""
    lines = [
        (
            "| GPU | checkpointing | optimizer | rollout s | update s | iteration s | branch KV cache GiB | "
            "activations GiB | optimizer GiB | peak GiB | GPU GiB | fits |"
        ),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in plans:
        s = p.settings
        rollout = sum(x.seconds for x in p.phases if x.name in ("prefix", "branches"))
        update = sum(x.seconds for x in p.phases if x.name in ("update", "reference"))
        kv = p.branch_cache_bytes
        optim = next(m.bytes for m in p.memory if m.name.startswith("optimizer state"))
        lines.append(
            f"| {p.gpu.name} | {'on' if s.gradient_checkpointing else 'off'} | {s.optim} | {rollout:.1f} | "
            f"{update:.1f} | {p.seconds:.1f} | {kv / GiB:.1f} | {p.activations[s.gradient_checkpointing].saved / GiB:.1f}"
            f" | {optim / GiB:.2f} | {p.peak_memory_bytes / GiB:.1f} | {p.gpu.memory_bytes / GiB:.1f} | "
            f"{'yes' if p.fits else '**no**'} |"
        )
    return "\n".join(lines) + "\n"
