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
"""Combining the semi-on-policy and on-policy adapters: `W0 + ΔW_semi + s·ΔW_on` (AR-CoPO's merge)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .quantization import quantized_parameters


if TYPE_CHECKING:
    from .pipelines import SelfForcingPipeline


def combine_adapters(
    pipeline: SelfForcingPipeline,
    semi_adapter: str = "semi",
    on_policy_adapter: str = "on_policy",
    scale: float = 0.8,
    fuse: bool = False,
) -> None:
    """
    Make `pipeline.transformer` compute `W0 + ΔW_semi + scale·ΔW_on` (paper: `scale=0.8` for Self-Forcing, 0.5 for
    Causal-Forcing), with both adapters already loaded (e.g. `pipe.load_lora_weights(path, adapter_name="semi")`).

    With `fuse=False` the adapters stay separate and are weighted at every forward (`set_adapters`); with
    `fuse=True` the weighted sum is folded into the base weights (`fuse_lora`), so inference costs nothing extra and
    `unload_lora_weights()` can then drop the adapter modules. A quantised base (bitsandbytes) cannot be fused into
    and is refused with `fuse=True`; `fuse=False` works on it.
    """
    loaded = set(pipeline.transformer.peft_config) if getattr(pipeline.transformer, "peft_config", None) else set()
    missing = [name for name in (semi_adapter, on_policy_adapter) if name not in loaded]
    if missing:
        raise ValueError(
            f"Adapters {missing} are not loaded (loaded: {sorted(loaded) or 'none'}); load them first with "
            "`pipe.load_lora_weights(path, adapter_name=...)`."
        )
    quantized = quantized_parameters(pipeline.transformer) if fuse else []
    if quantized:
        raise ValueError(
            f"`fuse=True` would fold the adapters into quantised base weights ({len(quantized)} bitsandbytes "
            f"tensors, e.g. {quantized[0]}), which cannot hold them without dequantising. Use `fuse=False` (the "
            "adapters stay separate, same outputs), or reload the base unquantised and fuse there."
        )
    pipeline.set_adapters([semi_adapter, on_policy_adapter], adapter_weights=[1.0, scale])
    if fuse:
        pipeline.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[semi_adapter, on_policy_adapter])
