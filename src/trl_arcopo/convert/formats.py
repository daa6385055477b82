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
The checkpoint formats the converter reads: what each release's file holds and how its keys map to diffusers names
(generator state dicts, LongLive's PEFT LoRA), and the pipeline settings that make a converted generator sample as
its reference does ([`pipeline_settings`]).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io_utils import load_tensors_only
from ..sampling import SELF_FORCING_SIGMAS


logger = logging.getLogger(__name__)

#: Module-name infixes added by training wrappers (FSDP, activation checkpointing, `torch.compile`), removed anywhere.
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: Leading prefixes of the wrapped generator (Self-Forcing's `WanDiffusionWrapper.model`, ComfyUI-style files).
WRAPPER_PREFIXES = ("model.diffusion_model.", "model.")
#: Names of the generator state dicts inside a Self-Forcing checkpoint.
GENERATOR_KEY, GENERATOR_EMA_KEY = "generator", "generator_ema"
#: LongLive's third name for the generator state dict, and the key of the PEFT state dict in its LoRA file.
MODEL_KEY, LORA_KEY = "model", "generator_lora"
#: Leading prefix of a PEFT model's keys (`get_peft_model_state_dict` of `get_peft_model(wan, ...)`).
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: The checkpoint formats `convert_checkpoint` reads (see `pipeline_settings` for what each sets).
FORMATS = ("self-forcing", "longlive", "causal-forcing", "krea")
#: Causal-Forcing's releases: `chunkwise/`, `framewise/` and `causal-forcing++/framewise-{2,1}step.pt`.
CAUSAL_FORCING_VARIANTS = ("chunkwise", "framewise", "framewise-2step", "framewise-1step")
#: LongLive v1.0's LoRA scale: r = alpha = 256 on every linear layer of the attention blocks.
LONGLIVE_LORA_ALPHA = 256.0
#: Krea realtime's timesteps, used as given (`warp_denoising_step: false`): Self-Forcing's warped ones, truncated.
KREA_TIMESTEPS = (1000, 937, 833, 625)
#: The adapter that a LongLive conversion without `merge_lora` leaves on the returned pipeline's transformer.
LORA_ADAPTER_NAME = "default"
_NAMES = {
    "self-forcing": "Self-Forcing",
    "longlive": "LongLive",
    "causal-forcing": "Causal-Forcing",
    "krea": "Krea realtime",
}


def _wan_base(format: str) -> str:
    return "Wan2.1-T2V-14B" if format == "krea" else "Wan2.1-T2V-1.3B"


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"Unknown `format={format!r}`; use one of {FORMATS}.")


def _unshift(timesteps: tuple[int, ...], shift: float = 5.0) -> list[float]:
    """The sigmas that the scheduler's warp `shift·s / (1 + (shift - 1)·s)` maps to `timesteps / 1000`."""
    return [t / 1000 / (shift - (shift - 1) * t / 1000) for t in timesteps]


def pipeline_settings(format: str = "self-forcing", variant: str | None = None) -> dict[str, Any]:
    r"""
    The [`SelfForcingPipeline`] arguments that make a converted pipeline sample as the reference generator does.

    Schedules are sigmas before the shift-5 warp of [`~trl_arcopo.sampling.self_forcing_scheduler`], chosen so that
    `pipeline.get_schedule()` gives the reference's timesteps:

    - `"self-forcing"`: chunks of 3 latent frames, 4 steps (timesteps `[1000, 750, 500, 250]` warped with shift 5:
      `[1000, 937.5, 833.3, 625]`), every committed frame cached. These are the pipeline's defaults, so the config is
      the one this converter always wrote (`default_sigmas=None`).
    - `"longlive"` (LongLive v1.0): the same chunks and steps; a rolling KV cache, a chunk attending to 12 frames
      (itself included), among them always the first 3 frames of the video (sink).
    - `"causal-forcing"`: every committed frame cached; `variant` `"chunkwise"` (3 frames, 4 steps), `"framewise"` (1
      frame, 4 steps), `"framewise-2step"` and `"framewise-1step"` (Causal-Forcing++: 1 frame, timesteps
      `[1000, 500]` and `[1000]` before the warp, the first chunk with the 4 steps).
    - `"krea"` (Krea realtime 14B): 3 frames, timesteps `[1000, 937, 833, 625]` as given (already warped: the sigmas
      are the ones the warp maps to `t / 1000`, so the pipeline's scheduler keeps shift 5), keys and values
      recomputed every chunk from the clean latents of the first frame (sink) and the most recent ones, 6 frames in
      all with the chunk itself.

    Args:
        format (`str`, defaults to `"self-forcing"`):
            One of `FORMATS`.
        variant (`str`, *optional*):
            For `"causal-forcing"`, where it is required: one of `CAUSAL_FORCING_VARIANTS`.

    Returns:
        `dict[str, Any]`: `default_num_frames_per_chunk`, `default_sigmas`, `default_first_chunk_sigmas`,
        `cache_policy`, `local_attn_frames` and `sink_frames`.
    """
    _check_format(format)
    if format == "causal-forcing" and variant not in CAUSAL_FORCING_VARIANTS:
        raise ValueError(
            f"`format='causal-forcing'` needs `variant` (`--variant`), one of {CAUSAL_FORCING_VARIANTS}, got "
            f"{variant!r}: `chunkwise` for `chunkwise/causal_forcing.pt`, `framewise` for "
            "`framewise/causal_forcing.pt`, `framewise-2step` / `framewise-1step` for "
            "`causal-forcing++/framewise-2step.pt` / `framewise-1step.pt`."
        )
    if format != "causal-forcing" and variant is not None:
        raise ValueError(f"`variant={variant!r}` is for `format='causal-forcing'` only; {format!r} has no variants.")
    four_steps = list(SELF_FORCING_SIGMAS)
    settings = {
        "default_num_frames_per_chunk": 3,
        "default_sigmas": four_steps,
        "default_first_chunk_sigmas": None,
        "cache_policy": "full",
        "local_attn_frames": None,
        "sink_frames": 0,
    }
    if format == "self-forcing":
        settings["default_sigmas"] = None  # the pipeline's default, the same 4 steps
    elif format == "longlive":
        settings.update(cache_policy="rolling", local_attn_frames=12, sink_frames=3)
    elif format == "causal-forcing" and variant != "chunkwise":
        settings["default_num_frames_per_chunk"] = 1
        if variant != "framewise":
            settings["default_sigmas"] = [1.0, 0.5] if variant == "framewise-2step" else [1.0]
            settings["default_first_chunk_sigmas"] = four_steps
    elif format == "krea":
        settings.update(
            default_sigmas=_unshift(KREA_TIMESTEPS), cache_policy="recompute", local_attn_frames=6, sink_frames=1
        )
    return settings


def _strip_wrappers(key: str) -> str:
    for infix in WRAPPER_INFIXES:
        key = key.replace(infix, "")
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_self_forcing_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""
    Rename a Self-Forcing (original Wan2.1) transformer state dict to the diffusers `WanTransformer3DModel` layout.

    Wrapper names are removed first (a leading `model.`, and `_fsdp_wrapped_module.` / `_orig_mod.` anywhere), then
    diffusers' own `convert_wan_transformer_to_diffusers` renames the keys (e.g. `blocks.0.self_attn.q` ->
    `blocks.0.attn1.to_q`, and the swap of `norm2` and `norm3`). Tensors are neither copied nor cast. The state dicts
    of every format of [`convert_checkpoint`] use these names.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the generator's state dict; it is not modified.

    Returns:
        `dict[str, torch.Tensor]`: the same tensors under diffusers names.
    """
    if not state_dict:
        raise ValueError("The state dict is empty: there is no transformer to convert.")
    stripped = {}
    for key, tensor in state_dict.items():
        new_key = _strip_wrappers(key)
        if new_key in stripped:
            raise ValueError(f"Two keys of the state dict become `{new_key}` once wrapper names are removed.")
        stripped[new_key] = tensor
    if any(key.startswith("condition_embedder.") or ".attn1." in key for key in stripped):
        raise ValueError(
            "This state dict already uses diffusers names (`condition_embedder.*`, `attn1`): load it with "
            "`CausalWanTransformer3DModel.load_state_dict` directly instead of converting it."
        )
    # diffusers' function empties the dict it is given: pass it our own copy
    return convert_wan_transformer_to_diffusers(stripped)


def _found_keys(mapping: Mapping) -> str:
    return ", ".join(repr(key) for key in list(mapping)[:20])


def _lora_keys(mapping: Mapping) -> list[str]:
    return [key for key in mapping if isinstance(key, str) and (".lora_A." in key or ".lora_B." in key)]


def _refuse_lora(mapping: Mapping, path: str | os.PathLike) -> None:
    """Refuse a LoRA file (or a generator with LoRA layers) where a generator checkpoint is expected."""
    lora_keys = _lora_keys(mapping)
    if LORA_KEY not in mapping and not lora_keys:
        return
    found = f"a `{LORA_KEY}` state dict" if LORA_KEY in mapping else f"keys such as `{lora_keys[0]}`"
    raise ValueError(
        f"{path} holds LoRA weights ({found}): it is a LoRA file, not a generator checkpoint. Pass it as the LoRA "
        "(`lora_path` / `--lora`, with `format='longlive'`) and the base weights (LongLive's "
        "`models/longlive_base.pt`) as the checkpoint."
    )


def _load_safetensors_generator(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if Path(path).suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a `.safetensors` file: Krea realtime's generator is `krea-realtime-video-14b.safetensors` "
            "(Hub repo `krea/krea-realtime-video`), read without pickle. A `.pt` checkpoint with Self-Forcing's "
            "layout converts with `format='self-forcing'` / `--format self-forcing`."
        )
    try:
        state_dict = load_file(path, device="cpu")
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); download `krea-realtime-video-14b.safetensors` again."
        ) from None
    _refuse_lora(state_dict, path)
    return state_dict


def load_generator_state_dict(
    path: str | os.PathLike, format: str = "self-forcing", use_ema: bool = True
) -> dict[str, torch.Tensor]:
    r"""
    Read the generator state dict (original Wan names) of a checkpoint in one of the `FORMATS`.

    Args:
        path (`str` or `os.PathLike`):
            `"krea"`: the `.safetensors` file, read with `safetensors`. Every other format: a `.pt` file, read on CPU
            with `weights_only=True` (no pickled code runs), holding `generator` and/or `generator_ema` state dicts
            (LongLive: or `model`), or itself a state dict.
        format (`str`, defaults to `"self-forcing"`):
            One of `FORMATS`.
        use_ema (`bool`, defaults to `True`):
            Take `generator_ema` when present; without it, `generator` (LongLive: else `model`) is used and a warning
            is logged. Krea's file holds one state dict: `False` is refused.

    Returns:
        `dict[str, torch.Tensor]`: the chosen state dict, keys unchanged (see [`convert_self_forcing_state_dict`]).

    Raises:
        `ValueError`: naming what the file holds and the fix, for a LoRA file (pass it as the LoRA), a `.safetensors`
            file for a `.pt` format or the reverse, or a file without a generator state dict (its keys are listed).
    """
    _check_format(format)
    if format == "krea":
        if not use_ema:
            raise ValueError("Krea realtime's file holds a single state dict: drop `use_ema=False` / `--no_ema`.")
        return _load_safetensors_generator(path)
    name = _NAMES[format]
    if Path(path).suffix == ".safetensors":
        raise ValueError(
            f"{path} is a safetensors file, but {name} checkpoints are PyTorch `.pt` files. Krea realtime's "
            "`krea-realtime-video-14b.safetensors` converts with `format='krea'` / `--format krea`."
        )
    checkpoint = load_tensors_only(path, f"a {name} checkpoint")
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} does not hold a {name} checkpoint (got {type(checkpoint).__name__}).")
    _refuse_lora(checkpoint, path)
    names = [GENERATOR_EMA_KEY, GENERATOR_KEY] + ([MODEL_KEY] if format == "longlive" else [])
    fallback = next((key for key in names[1:] if key in checkpoint), None)
    if GENERATOR_EMA_KEY in checkpoint and use_ema:
        state_dict = checkpoint[GENERATOR_EMA_KEY]
    elif fallback is not None:
        if use_ema:
            logger.warning(
                f"{path} has no `{GENERATOR_EMA_KEY}` weights; using `{fallback}` (pass `use_ema=False` / "
                "`--no_ema` to silence this)."
            )
        state_dict = checkpoint[fallback]
    elif all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state_dict = checkpoint  # the file is the state dict itself
    else:
        wanted = [f"`{key}`" for key in (names if use_ema else names[1:])]
        wanted = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"
        hint = ""
        if MODEL_KEY in checkpoint and format != "longlive":
            hint = " A `model` state dict is LongLive's layout: pass `format='longlive'` / `--format longlive`."
        raise ValueError(
            f"{path} has no {wanted} state dict (nor is it a state dict itself); found keys: "
            f"{_found_keys(checkpoint)}.{hint}"
        )
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"The generator state dict of {path} is not a dict of tensors: {name} stores one.")
    _refuse_lora(state_dict, path)
    return state_dict


def load_self_forcing_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> dict[str, torch.Tensor]:
    r"""
    Read the generator state dict (original Wan names) of a Self-Forcing checkpoint.

    Args:
        path (`str` or `os.PathLike`): a `.pt` file holding `generator` and/or `generator_ema` state dicts, or directly
            a state dict. It is read on CPU with `weights_only=True`.
        use_ema (`bool`, defaults to `True`): take `generator_ema` when present; if only `generator` exists, a warning
            is logged and `generator` is used.

    Returns:
        `dict[str, torch.Tensor]`: the chosen state dict, keys unchanged (see [`convert_self_forcing_state_dict`]).
    """
    return load_generator_state_dict(path, "self-forcing", use_ema)


def load_lora_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    r"""
    Read a LongLive LoRA file (`models/lora.pt`): a PEFT state dict of `lora_A` / `lora_B` weights on original Wan
    names, at the top level or under `generator_lora`. It is read on CPU with `weights_only=True`.

    Returns:
        `dict[str, torch.Tensor]`: the LoRA state dict, keys unchanged (see [`convert_lora_state_dict`]).
    """
    if Path(path).suffix == ".safetensors":
        raise ValueError(
            f"{path} is a safetensors file, but LongLive's LoRA is the PEFT `.pt` file `models/lora.pt`. A LoRA "
            "already in the diffusers format loads directly with `pipe.load_lora_weights(...)`."
        )
    checkpoint = load_tensors_only(path, "a LoRA file")
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} does not hold a LoRA state dict (got {type(checkpoint).__name__}).")
    state_dict = checkpoint.get(LORA_KEY, checkpoint)
    if not isinstance(state_dict, dict) or not _lora_keys(state_dict):
        hint = ""
        if {GENERATOR_KEY, GENERATOR_EMA_KEY, MODEL_KEY} & checkpoint.keys() or state_dict is checkpoint:
            hint = (
                " It looks like generator weights: pass it as the checkpoint (`--checkpoint`), and the LoRA file "
                "(LongLive's `models/lora.pt`) as `lora_path` / `--lora`."
            )
        raise ValueError(
            f"{path} holds no LoRA weights (a `{LORA_KEY}` state dict, or keys ending in `{LORA_A_SUFFIX}` / "
            f"`{LORA_B_SUFFIX}`); found keys: {_found_keys(checkpoint)}.{hint}"
        )
    return state_dict


def _strip_lora_wrappers(module: str) -> str:
    for infix in WRAPPER_INFIXES:
        module = module.replace(infix, "")
    prefixes = (PEFT_PREFIX, *WRAPPER_PREFIXES)  # in any order: `model.base_model.model.`, `base_model.model.model.`
    while prefix := next((p for p in prefixes if module.startswith(p)), None):
        module = module[len(prefix) :]
    return module


def convert_lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""
    Rename a PEFT LoRA state dict on original Wan2.1 names (LongLive's `lora.pt`) to diffusers names.

    Wrapper names are removed (`base_model.model.` and `model.` at the start, `_fsdp_wrapped_module.` anywhere), then
    each adapted layer is renamed exactly as [`convert_self_forcing_state_dict`] renames its weight, so the LoRA lands
    on the layers the base weights go to: `base_model.model.blocks.0.self_attn.q.lora_A.weight` ->
    `blocks.0.attn1.to_q.lora_A.weight`, `blocks.0.ffn.0` -> `blocks.0.ffn.net.0.proj`. These are the keys of
    `peft.get_peft_model_state_dict` on the diffusers transformer; a diffusers LoRA file prefixes them with
    `transformer.`. Tensors are neither copied nor cast.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            Only `<layer>.lora_A.weight` (`[r, in]`) and `<layer>.lora_B.weight` (`[out, r]`) keys, both for each
            layer, with one rank `r`; it is not modified.

    Returns:
        `dict[str, torch.Tensor]`: the same tensors under diffusers names.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in (LORA_A_SUFFIX, LORA_B_SUFFIX) if key.endswith(s)), None)
        if suffix is None or not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
            raise ValueError(
                f"`{key}` is not a LoRA matrix `<layer>{LORA_A_SUFFIX}` / `<layer>{LORA_B_SUFFIX}`: a LongLive LoRA "
                "is a PEFT state dict of plain LoRA layers (no bias, no DoRA magnitude)."
            )
        layer = _strip_lora_wrappers(key[: -len(suffix)])
        if suffix in layers.setdefault(layer, {}):
            raise ValueError(
                f"Two keys of the LoRA state dict become `{layer}{suffix}` once wrapper names are removed."
            )
        layers[layer][suffix] = tensor
    if not layers:
        raise ValueError("The LoRA state dict is empty: there is no adapter to convert.")
    unpaired = sorted(layer for layer, pair in layers.items() if len(pair) != 2)
    if unpaired:
        raise ValueError(f"{len(unpaired)} LoRA layers lack their `lora_A` or `lora_B` weight: {unpaired[:5]}.")
    ranks = {pair[LORA_A_SUFFIX].shape[0] for pair in layers.values()}
    ranks |= {pair[LORA_B_SUFFIX].shape[1] for pair in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"The LoRA layers have different ranks {sorted(ranks)}; only a single rank is supported.")
    if any(".attn1." in layer or ".attn2." in layer for layer in layers):
        raise ValueError(
            "This LoRA already uses diffusers names (`attn1`, `attn2`): load it with `pipe.load_lora_weights` instead "
            "of converting it."
        )
    # the base weights' renaming, applied to each layer's `.weight` key (values: the layer's original name)
    renamed = convert_self_forcing_state_dict({f"{layer}.weight": layer for layer in layers})
    return {
        new_key.removesuffix(".weight") + suffix: tensor
        for new_key, layer in renamed.items()
        for suffix, tensor in layers[layer].items()
    }


def _lora_layers(lora_state_dict: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key.removesuffix(LORA_A_SUFFIX) for key in lora_state_dict if key.endswith(LORA_A_SUFFIX))


def _check_lora_fits(state_dict: dict[str, torch.Tensor], lora_state_dict: dict[str, torch.Tensor]) -> None:
    for layer in _lora_layers(lora_state_dict):
        a, b = lora_state_dict[layer + LORA_A_SUFFIX], lora_state_dict[layer + LORA_B_SUFFIX]
        weight = state_dict.get(f"{layer}.weight")
        if weight is None or weight.ndim != 2:
            raise ValueError(
                f"The LoRA adapts `{layer}`, which is not a linear layer of the converted checkpoint: the LoRA does "
                "not belong to this base model."
            )
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(
                f"The LoRA of `{layer}` is {b.shape[0]}x{a.shape[1]} but its weight is {list(weight.shape)}: the LoRA "
                "does not belong to this base model."
            )


def merge_lora_state_dict(
    state_dict: dict[str, torch.Tensor], lora_state_dict: dict[str, torch.Tensor], lora_alpha: float
) -> dict[str, torch.Tensor]:
    r"""
    Merge a LoRA into transformer weights: `W + (lora_alpha / r)·B·A` for every adapted layer, computed in fp32.

    Args:
        state_dict (`dict[str, torch.Tensor]`): diffusers-named weights (see [`convert_self_forcing_state_dict`]).
        lora_state_dict (`dict[str, torch.Tensor]`): diffusers-named LoRA (see [`convert_lora_state_dict`]).
        lora_alpha (`float`): the LoRA's alpha (LongLive: 256); `r` is read from the tensors.

    Returns:
        `dict[str, torch.Tensor]`: a new dict, the merged weights in fp32 and the others shared with `state_dict`
        (neither input is modified).
    """
    _check_lora_fits(state_dict, lora_state_dict)
    merged = dict(state_dict)
    for layer in _lora_layers(lora_state_dict):
        a, b = lora_state_dict[layer + LORA_A_SUFFIX].float(), lora_state_dict[layer + LORA_B_SUFFIX].float()
        merged[f"{layer}.weight"] = merged[f"{layer}.weight"].float() + (lora_alpha / a.shape[0]) * (b @ a)
    return merged
