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
"""The policy: a LoRA adapter on the generator's transformer; the reference policy is the same transformer with it off."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, PeftConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

#: The projections the default adapter targets: attention and feed-forward layers of every block.
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@contextmanager
def reference_policy(transformer: torch.nn.Module):
    """The frozen base (the reference policy): the LoRA adapters disabled for the duration of the block."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def check_trainable_peft_config(config: PeftConfig, adapter_name: str) -> None:
    """
    Refuse a PEFT config whose trainable parameters the trainer would not train or save: only LoRA (with
    `modules_to_save`) is supported, without trainable biases or token indices.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"The adapter {adapter_name!r} is a {type(config).__name__}; ARCoPOTrainer trains LoRA adapters only "
            "(the reference policy is the transformer with the adapter disabled): pass a `peft.LoraConfig`."
        )
    if config.bias != "none":
        raise ValueError(
            f"`LoraConfig(bias={config.bias!r})` trains the base model's biases, which are shared with the reference "
            "policy and not saved with the adapter: use `bias='none'` (add the module to `modules_to_save` to train "
            "its own copy instead)."
        )
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(
            "`LoraConfig(trainable_token_indices=...)` trains text-embedding rows, which the video transformer does not "
            "have: remove it."
        )


def add_policy_adapter(
    transformer: torch.nn.Module, peft_config: PeftConfig | None, adapter_name: str | None, default_name: str
) -> str:
    """
    Make the trained adapter of `transformer` and return its name: `peft_config` added as `adapter_name` (default
    `default_name`); without a config, the adapter already loaded (the active one, or `adapter_name`), else a default
    LoRA (r=64, alpha=128, `DEFAULT_LORA_TARGETS`, the paper's). Only that adapter is active and trainable: its LoRA
    factors and `modules_to_save` copies, nothing of the base.
    """
    loaded = list(transformer.peft_config) if getattr(transformer, "_hf_peft_config_loaded", False) else []
    if adapter_name is None:
        adapter_name = transformer.active_adapters()[0] if peft_config is None and loaded else default_name
    if peft_config is not None:
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"`peft_config` must be a peft.PeftConfig, got {type(peft_config).__name__}.")
        if adapter_name in loaded:
            raise ValueError(
                f"The transformer already has an adapter named {adapter_name!r} and a `peft_config` was given: "
                f"set `adapter_name` to a new name, or pass no `peft_config` to keep training {adapter_name!r}."
            )
        transformer.add_adapter(peft_config, adapter_name=adapter_name)
    elif adapter_name not in loaded:
        logger.info(f"No `peft_config`: adding a LoRA adapter {adapter_name!r} with r=64, alpha=128 (paper).")
        config = LoraConfig(r=64, lora_alpha=128, target_modules=DEFAULT_LORA_TARGETS)
        transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)  # only the trained adapter is active; others stay loaded, unused
    config = transformer.peft_config[adapter_name]
    check_trainable_peft_config(config, adapter_name)
    if config.modules_to_save:
        logger.warning(
            f"The adapter trains full copies of {config.modules_to_save} (`modules_to_save`). diffusers' "
            "`load_lora_weights` refuses such files: load the saved adapter with "
            "`trl_arcopo.lora_files.load_lora_adapter_weights` after `transformer.add_adapter(the same LoraConfig)`."
        )
    for name, param in transformer.named_parameters():
        param.requires_grad_(f".{adapter_name}." in name and ("lora_" in name or ".modules_to_save." in name))
    return adapter_name


def prepare_for_training(
    transformer: torch.nn.Module, disable_dropout: bool = True, gradient_checkpointing: bool = False
) -> None:
    """Dropout off (rollouts and updates see the same policy), trainable parameters in float32, optional checkpointing."""
    if disable_dropout:
        for module in transformer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    cast_training_params(transformer, dtype=torch.float32)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()  # diffusers' checkpointing of the transformer blocks


def check_adapters_in_sync(accelerator, adapter_state: dict[str, torch.Tensor]) -> bool:
    """
    Check, across all processes, that every rank holds the same adapter weights (what DDP guarantees); raise a
    `RuntimeError` if not. Returns `True` and logs the check on a single process too.
    """
    flat = torch.cat([p.flatten().float() for p in adapter_state.values()])  # [num_lora_params]
    gathered = accelerator.gather(flat[None])  # [num_processes, num_lora_params]
    max_diff = (gathered - gathered[:1]).abs().max().item()
    if max_diff != 0:
        raise RuntimeError(f"The adapters differ across processes (max |diff| = {max_diff}).")
    logger.warning(f"Adapter weights are identical on all {accelerator.num_processes} process(es).")
    return True
