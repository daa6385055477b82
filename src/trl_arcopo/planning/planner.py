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
"""Planning one AR-CoPO iteration ([`plan`]): every phase's FLOPs and seconds, and the memory at the worst pivot."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .costs import (
    ActivationEstimate,
    _LoRALayout,
    _outer_linears,
    _Pass,
    activation_bytes,
    backward_flops,
    forward_flops,
    forward_workspace,
    wan_block_parameters,
    wan_transformer_parameters,
)
from .inputs import GPUSpec, TransformerShape, VideoShape, get_gpu, get_preset
from .report import MemoryItem, PhaseCost, Plan, format_bytes
from .settings import DTYPE_BYTES, RunSettings, _Precision


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
    loss_candidates = g_all if s.loss.compares_candidates else 1
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
