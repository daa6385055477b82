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
"""LoRA adapter files in the diffusers format: saving one adapter atomically, and loading a file into an existing adapter."""

from __future__ import annotations

import json
import os

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from .io_utils import atomic_path
from .pipelines import SelfForcingPipeline


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_PREFIX = f"{SelfForcingPipeline.transformer_name}."

# Adapter hyper-parameters that change the forward pass without changing any tensor shape: a resumed adapter must match.
_SCALING_KEYS = ("lora_alpha", "use_rslora", "use_dora")


def _check_adapter(transformer: torch.nn.Module, adapter_name: str) -> None:
    available = list(getattr(transformer, "peft_config", None) or {})
    if adapter_name not in available:
        raise ValueError(
            f"The transformer has no LoRA adapter named {adapter_name!r}; available adapters: {available or 'none'}."
        )


def save_lora_adapter(
    transformer: torch.nn.Module,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME,
) -> str:
    r"""
    Save one LoRA adapter of a transformer in the diffusers LoRA format, atomically.

    The file holds the adapter weights under `transformer.`-prefixed keys plus the adapter config as metadata (so
    `lora_alpha` and the other hyper-parameters survive), and loads with `load_lora_weights` into a
    [`SelfForcingPipeline`] or a stock `diffusers.WanPipeline`, or with [`load_lora_adapter_weights`] into an existing
    adapter to resume training.

    The file is written atomically ([`~trl_arcopo.io_utils.atomic_path`]: under a temporary name next to it, flushed
    to disk, then moved over the final path): a crash never leaves a truncated or corrupt adapter file, and the
    previous file stays intact until the new one is complete.

    Args:
        transformer (`torch.nn.Module`):
            The (unwrapped: not DDP/FSDP/compiled) transformer holding the adapter, e.g. a
            [`CausalWanTransformer3DModel`] after `add_adapter`.
        output_dir (`str` or `os.PathLike`):
            The folder to save into; created if needed.
        adapter_name (`str`, defaults to `"default"`):
            The adapter to save.
        weight_name (`str`, defaults to `"pytorch_lora_weights.safetensors"`):
            The file name (no folder), the default one `load_lora_weights` looks for.

    Returns:
        `str`: the path of the saved file.

    Raises:
        `ValueError`: if the transformer has no adapter named `adapter_name` (the message lists the available ones),
            or `weight_name` is not a plain `.safetensors` file name.
    """
    _check_adapter(transformer, adapter_name)
    if os.path.basename(weight_name) != weight_name or not weight_name.endswith(".safetensors"):
        raise ValueError(f"`weight_name` must be a plain `.safetensors` file name, got {weight_name!r}.")
    state_dict = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    adapter_metadata = transformer.peft_config[adapter_name].to_dict()

    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    final_path = os.path.join(output_dir, weight_name)
    with atomic_path(final_path) as tmp_path:
        SelfForcingPipeline.save_lora_weights(
            output_dir,
            transformer_lora_layers=state_dict,
            weight_name=os.path.basename(tmp_path),
            transformer_lora_adapter_metadata=adapter_metadata,
        )
        if not os.path.isfile(tmp_path):
            raise RuntimeError(f"Saving the LoRA adapter did not produce {tmp_path}.")
    return final_path


def _format_keys(keys: list[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_lora_adapter_weights(
    transformer: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> None:
    r"""
    Load a diffusers-format LoRA file (as written by [`save_lora_adapter`]) into an *existing* adapter, e.g. to resume
    training: the adapter's parameters are overwritten in place (keeping their device, dtype and `requires_grad`), so
    an optimizer built on them stays valid.

    The file is checked against the adapter before anything is loaded: on a mismatch, the adapter is left untouched.

    Args:
        transformer (`torch.nn.Module`):
            The (unwrapped) transformer holding the adapter.
        path (`str` or `os.PathLike`):
            A folder containing `pytorch_lora_weights.safetensors`, or the `.safetensors` file itself.
        adapter_name (`str`, defaults to `"default"`):
            The adapter to load into; the name the file was saved from does not matter.

    Raises:
        `FileNotFoundError`: if there is no such file.
        `ValueError`: if the transformer has no adapter named `adapter_name`, or the file does not match it: keys
            the adapter does not have (unexpected), adapter keys the file lacks (missing), different shapes (e.g.
            another rank), or a different `lora_alpha` / `use_rslora` / `use_dora` in the file's metadata.
    """
    _check_adapter(transformer, adapter_name)
    path = os.fspath(path)
    file = os.path.join(path, LORA_WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"No LoRA weights file at {file}.")

    raw = load_file(file, device="cpu")
    with safe_open(file, framework="pt") as f:
        file_metadata = f.metadata() or {}

    state_dict = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in raw.items() if k.startswith(TRANSFORMER_PREFIX)}
    unexpected = [k for k in raw if not k.startswith(TRANSFORMER_PREFIX)]
    expected = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    unexpected += [TRANSFORMER_PREFIX + k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the adapter"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_format_keys(mismatched)}")
    if "lora_adapter_metadata" in file_metadata:
        saved = json.loads(file_metadata["lora_adapter_metadata"])
        config = transformer.peft_config[adapter_name]
        for key in _SCALING_KEYS:
            saved_value = saved.get(TRANSFORMER_PREFIX + key)
            if saved_value is not None and hasattr(config, key) and saved_value != getattr(config, key):
                problems.append(f"{key}={saved_value!r} in the file, {getattr(config, key)!r} in the adapter")
    if problems:
        raise ValueError(
            f"The LoRA file {file} does not match the adapter {adapter_name!r}: " + "; ".join(problems) + "."
        )

    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    # Safety net: everything was checked above, so peft should neither ignore a key nor leave an adapter key unset.
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"peft ignored keys of {file}: {_format_keys(unexpected)}.")
