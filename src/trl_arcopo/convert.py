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
Convert an original streaming-generator checkpoint into a diffusers [`SelfForcingPipeline`] folder.

Four releases share Self-Forcing's code lineage (a causal Wan2.1 transformer saved as a plain state dict under the
original Wan parameter names) and convert the same way. They differ in the file layout and in how they sample, which
the converted pipeline's config records (`format`, see [`pipeline_settings`]):

| format | reference | file | latent frames per chunk | steps | KV cache (window / sink frames) |
| --- | --- | --- | --- | --- | --- |
| `self-forcing` | guandeh17/Self-Forcing | `.pt` | 3 | 4 | full |
| `longlive` | NVlabs/LongLive v1.0 | `.pt`, and a PEFT LoRA `.pt` | 3 | 4 | rolling, 12 / 3 |
| `causal-forcing` | thu-ml/Causal-Forcing | `.pt` | 3 or 1 (`variant`) | 4, 2 or 1 | full |
| `krea` | krea-ai/realtime-video (14B) | `.safetensors` | 3 | 4 | recompute, 6 / 1 |

Only the transformer weights come from the checkpoint: the tokenizer, the UMT5 text encoder, the VAE and the
transformer config are taken from a Wan2.1-T2V diffusers folder (1.3B; 14B for Krea).

```bash
hf download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt --local-dir .
hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir Wan2.1-T2V-1.3B-Diffusers
trl-arcopo-convert --checkpoint checkpoints/self_forcing_dmd.pt --wan_pipeline Wan2.1-T2V-1.3B-Diffusers \\
    --output self-forcing-diffusers
```

The output then loads with `SelfForcingPipeline.from_pretrained("self-forcing-diffusers")`; `docs/convert.md` gives
the command of every format.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from .io_utils import load_tensors_only
from .lora_files import LORA_WEIGHT_NAME, save_lora_adapter
from .models import CausalWanTransformer3DModel
from .pipelines import SelfForcingPipeline
from .sampling import SELF_FORCING_SIGMAS, self_forcing_scheduler


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


def _add_lora_adapter(
    transformer: CausalWanTransformer3DModel, lora_state_dict: dict[str, torch.Tensor], lora_alpha: float
) -> None:
    """Add the diffusers-named LoRA to `transformer` as the adapter `LORA_ADAPTER_NAME`, with its weights."""
    layers = _lora_layers(lora_state_dict)
    rank = lora_state_dict[layers[0] + LORA_A_SUFFIX].shape[0]
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=layers)
    transformer.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    result = set_peft_model_state_dict(transformer, lora_state_dict, adapter_name=LORA_ADAPTER_NAME)
    missing = get_peft_model_state_dict(transformer, adapter_name=LORA_ADAPTER_NAME).keys() - lora_state_dict.keys()
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:  # a safety net: the layers were checked against the weights before
        raise RuntimeError(f"The LoRA did not load: missing keys {sorted(missing)[:5]}, unexpected {unexpected[:5]}.")


def _keeps_fp32(name: str, modules: list[str]) -> bool:
    return any(module in name.split(".") for module in modules)


def _build_transformer(
    state_dict: dict[str, torch.Tensor],
    config_path: str | os.PathLike,
    dtype: torch.dtype,
    wan_base: str = "Wan2.1-T2V-1.3B",
) -> CausalWanTransformer3DModel:
    """A `CausalWanTransformer3DModel` from a config folder and diffusers-named weights, cast like diffusers does."""
    config = CausalWanTransformer3DModel.load_config(config_path)
    with init_empty_weights():  # parameters on `meta`, filled below; buffers (RoPE tables) built normally
        transformer = CausalWanTransformer3DModel.from_config(config)
    fix = f"The checkpoint must be a {wan_base} model, and `wan_pipeline_path` a {wan_base} diffusers folder."
    expected = transformer.state_dict().keys()
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"The converted checkpoint does not fit the transformer config in {config_path}: "
            f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}. {fix}"
        )
    # as diffusers' `from_pretrained(torch_dtype=...)`: `_keep_in_fp32_modules` (norms, modulation, ...) stay fp32
    keep = transformer._keep_in_fp32_modules or []
    state_dict = {
        name: tensor.to(torch.float32 if _keeps_fp32(name, keep) else dtype) if tensor.is_floating_point() else tensor
        for name, tensor in state_dict.items()
    }
    try:
        transformer.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"The converted checkpoint does not fit the transformer config in {config_path}: {error} {fix}"
        ) from error
    return transformer.eval()


def _check_output(output_path: Path, overwrite: bool) -> None:
    if not output_path.exists() or overwrite:
        return
    if not output_path.is_dir() or any(output_path.iterdir()):
        raise FileExistsError(f"{output_path} already exists and is not empty; pass `overwrite=True` / `--overwrite`.")


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    wan_pipeline_path: str | os.PathLike,
    output_path: str | os.PathLike,
    format: str = "self-forcing",
    variant: str | None = None,
    lora_path: str | os.PathLike | None = None,
    lora_alpha: float = LONGLIVE_LORA_ALPHA,
    merge_lora: bool = False,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SelfForcingPipeline:
    r"""
    Convert a streaming generator's checkpoint into a [`SelfForcingPipeline`] saved at `output_path`.

    The transformer config, tokenizer, text encoder and VAE come from `wan_pipeline_path`; the transformer weights from
    the checkpoint (which must match that config exactly); the chunk size, schedule and KV-cache policy of the
    pipeline's config from `format` (see [`pipeline_settings`]). Every argument and both files are checked before
    anything is written. The folder is written next to `output_path` under a temporary name and renamed into place at
    the end, so an interrupted run never leaves a half-written output.

    Args:
        checkpoint_path (`str` or `os.PathLike`):
            The generator file: Self-Forcing's `checkpoints/self_forcing_dmd.pt`, LongLive's `models/longlive_base.pt`,
            one of Causal-Forcing's `causal_forcing.pt` / `framewise-{1,2}step.pt`, or Krea realtime's
            `krea-realtime-video-14b.safetensors`.
        wan_pipeline_path (`str` or `os.PathLike`):
            A Wan2.1-T2V diffusers folder with `tokenizer`, `text_encoder`, `vae` and `transformer/config.json`:
            Wan2.1-T2V-1.3B, or Wan2.1-T2V-14B for `"krea"`.
        output_path (`str` or `os.PathLike`):
            The folder to write.
        format (`str`, defaults to `"self-forcing"`):
            One of `FORMATS`: `"self-forcing"`, `"longlive"`, `"causal-forcing"` or `"krea"`.
        variant (`str`, *optional*):
            `"causal-forcing"` only, required: `"chunkwise"`, `"framewise"`, `"framewise-2step"` or
            `"framewise-1step"` (the file's folder and name on the Hub).
        lora_path (`str` or `os.PathLike`, *optional*):
            `"longlive"` only: the PEFT LoRA file (`models/lora.pt`). With `merge_lora=False` it is saved next to the
            pipeline as `pytorch_lora_weights.safetensors` in the diffusers format (load it with
            `pipe.load_lora_weights(output_path)`, e.g. as the adapter that training goes on with), and the returned
            pipeline's transformer carries it as the adapter `"default"`.
        lora_alpha (`float`, defaults to 256):
            The LoRA's alpha (LongLive v1.0: 256, as its rank); the rank is read from the tensors.
        merge_lora (`bool`, defaults to `False`):
            Merge the LoRA into the transformer weights (`W + (alpha / r)·B·A`, in fp32) instead of saving it apart.
        use_ema (`bool`, defaults to `True`):
            Use the EMA weights (`generator_ema`) when the checkpoint has them (Krea's file has one state dict).
        dtype (`torch.dtype`, defaults to `torch.float32`):
            Dtype of the transformer and the text encoder. As in diffusers, the transformer's
            `_keep_in_fp32_modules` stay fp32; the VAE is always fp32.
        overwrite (`bool`, defaults to `False`):
            Replace an existing non-empty `output_path`.

    Returns:
        [`SelfForcingPipeline`]: the converted pipeline (on CPU), as saved.
    """
    settings = pipeline_settings(format, variant)
    if lora_path is not None and format != "longlive":
        raise ValueError(
            f"`lora_path` (`--lora`) is for `format='longlive'` (LongLive's `models/lora.pt`); {format!r} has no "
            "LoRA file."
        )
    if merge_lora and lora_path is None:
        raise ValueError("`merge_lora=True` (`--merge_lora`) needs the LoRA file: pass `lora_path` / `--lora`.")
    wan_base = _wan_base(format)
    wan_path, output_path = Path(wan_pipeline_path), Path(output_path)
    _check_output(output_path, overwrite)
    if not (wan_path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"{wan_path / 'transformer' / 'config.json'} not found: `wan_pipeline_path` must be a {wan_base} "
            f"diffusers folder (e.g. `hf download Wan-AI/{wan_base}-Diffusers --local-dir ...`)."
        )

    logger.info(f"Reading {checkpoint_path} ({format})")
    state_dict = convert_self_forcing_state_dict(load_generator_state_dict(checkpoint_path, format, use_ema))
    lora = None
    if lora_path is not None:
        logger.info(f"Reading the LoRA {lora_path}")
        lora = convert_lora_state_dict(load_lora_checkpoint(lora_path))
        if merge_lora:
            state_dict = merge_lora_state_dict(state_dict, lora, lora_alpha)
            lora = None
        else:
            _check_lora_fits(state_dict, lora)
    transformer = _build_transformer(state_dict, wan_path / "transformer", dtype, wan_base)
    del state_dict

    logger.info(f"Loading the tokenizer, text encoder and VAE from {wan_path}")
    tokenizer = AutoTokenizer.from_pretrained(wan_path / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(wan_path / "text_encoder", dtype=dtype).eval()
    vae = AutoencoderKLWan.from_pretrained(wan_path / "vae", torch_dtype=torch.float32).eval()
    pipeline = SelfForcingPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=self_forcing_scheduler(),
        vae=vae,
        default_height=480,
        default_width=832,
        default_num_frames=81,
        **settings,
    )

    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.tmp-", dir=output_path.parent))
    try:
        pipeline.save_pretrained(staging)  # the base weights: the adapter is added after
        if lora is not None:
            _add_lora_adapter(pipeline.transformer, lora, lora_alpha)
            save_lora_adapter(pipeline.transformer, staging, adapter_name=LORA_ADAPTER_NAME)
        _check_output(output_path, overwrite)  # nothing appeared meanwhile
        if output_path.is_dir() and not any(output_path.iterdir()):
            output_path.rmdir()
        if output_path.exists():  # overwrite: move the old output aside, then delete it once the new one is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.old-", dir=output_path.parent))
            os.replace(output_path, previous / output_path.name)
            os.replace(staging, output_path)
            shutil.rmtree(previous)
        else:
            os.replace(staging, output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"Saved the SelfForcingPipeline to {output_path}")
    if lora is not None:
        logger.info(
            f"The LoRA (r={transformer.peft_config[LORA_ADAPTER_NAME].r}, alpha={lora_alpha:g}) is saved as "
            f"{output_path / LORA_WEIGHT_NAME}: load it with `pipe.load_lora_weights({str(output_path)!r})`."
        )
    return pipeline


def convert_self_forcing_checkpoint(
    checkpoint_path: str | os.PathLike,
    wan_pipeline_path: str | os.PathLike,
    output_path: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SelfForcingPipeline:
    r"""
    Convert a Self-Forcing checkpoint into a [`SelfForcingPipeline`] saved at `output_path`: [`convert_checkpoint`]
    with `format="self-forcing"`.

    Args:
        checkpoint_path (`str` or `os.PathLike`): the Self-Forcing `.pt` file (e.g. `checkpoints/self_forcing_dmd.pt`
            of the Hub repo `gdhe17/Self-Forcing`).
        wan_pipeline_path (`str` or `os.PathLike`): a Wan2.1-T2V-1.3B diffusers folder with `tokenizer`,
            `text_encoder`, `vae` and `transformer/config.json`.
        output_path (`str` or `os.PathLike`): the folder to write.
        use_ema (`bool`, defaults to `True`): use the EMA weights (`generator_ema`) when the checkpoint has them.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the transformer and the text encoder. As in
            diffusers, the transformer's `_keep_in_fp32_modules` stay fp32; the VAE is always fp32.
        overwrite (`bool`, defaults to `False`): replace an existing non-empty `output_path`.

    Returns:
        [`SelfForcingPipeline`]: the converted pipeline (on CPU), as saved.
    """
    return convert_checkpoint(
        checkpoint_path, wan_pipeline_path, output_path, use_ema=use_ema, dtype=dtype, overwrite=overwrite
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point `trl-arcopo-convert` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="trl-arcopo-convert",
        description=(
            "Convert an original streaming-generator checkpoint (Self-Forcing, LongLive, Causal-Forcing, Krea "
            "realtime) into a diffusers SelfForcingPipeline folder."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Generator file: a .pt (e.g. self_forcing_dmd.pt, longlive_base.pt) or Krea's .safetensors.",
    )
    parser.add_argument(
        "--wan_pipeline",
        required=True,
        help="Wan2.1-T2V-1.3B-Diffusers folder (Wan2.1-T2V-14B for krea): tokenizer, text encoder, VAE, config.",
    )
    parser.add_argument("--output", required=True, help="Folder to write the SelfForcingPipeline to.")
    parser.add_argument(
        "--format", choices=FORMATS, default="self-forcing", help="Checkpoint format (sets chunk, steps, KV cache)."
    )
    parser.add_argument("--variant", choices=CAUSAL_FORCING_VARIANTS, help="Causal-Forcing release (required there).")
    parser.add_argument("--lora", help="LongLive's PEFT LoRA file (models/lora.pt).")
    parser.add_argument(
        "--lora_alpha", type=float, default=LONGLIVE_LORA_ALPHA, help="LoRA alpha (rank read from the file)."
    )
    parser.add_argument(
        "--merge_lora",
        action="store_true",
        help="Merge the LoRA into the weights (default: save it as pytorch_lora_weights.safetensors).",
    )
    parser.add_argument("--no_ema", action="store_true", help="Use `generator` instead of `generator_ema`.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Transformer/text encoder dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert_checkpoint(
        args.checkpoint,
        args.wan_pipeline,
        args.output,
        format=args.format,
        variant=args.variant,
        lora_path=args.lora,
        lora_alpha=args.lora_alpha,
        merge_lora=args.merge_lora,
        use_ema=not args.no_ema,
        dtype=DTYPES[args.dtype],
        overwrite=args.overwrite,
    )
    print(f"Saved the SelfForcingPipeline to {args.output}")


if __name__ == "__main__":
    main()
