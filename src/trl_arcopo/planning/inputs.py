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
"""What a plan is made from: GPUs, the transformer and video shapes, and the generators' presets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..attention_window import check_cache_policy
from ..latent_frames import latent_num_frames, pixel_num_frames


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
        return latent_num_frames(self.num_frames, self.vae_scale_factor_temporal, self.frame_packing)

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_scale_factor_spatial

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_scale_factor_spatial

    def pixel_frames(self, latent_frames: int) -> int:
        """The `num_frames` that gives `latent_frames` latent frames (the inverse of `latent_frames`)."""
        return pixel_num_frames(latent_frames, self.vae_scale_factor_temporal, self.frame_packing)

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
