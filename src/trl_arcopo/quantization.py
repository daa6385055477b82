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
bitsandbytes in the library: whether it is installed (with the extra that installs it), whether a module holds
quantised weights, and the diffusers configuration of a QLoRA base (a frozen 4-bit or 8-bit transformer).
"""

from __future__ import annotations

import importlib.util

import torch


#: The extra that installs bitsandbytes: `pip install "trl_arcopo[quantization]"`.
QUANTIZATION_EXTRA = "quantization"
_QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")


def require_bitsandbytes(feature: str, extra: str = QUANTIZATION_EXTRA) -> None:
    """Raise an `ImportError` naming `feature` and the extra to install when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f'{feature} needs bitsandbytes, which is not installed: `pip install "trl_arcopo[{extra}]"` '
            "(or `pip install bitsandbytes`)."
        )


def quantized_parameters(module: torch.nn.Module) -> list[str]:
    """The names of `module`'s bitsandbytes-quantised weights (4-bit `Params4bit` or 8-bit `Int8Params`)."""
    return [name for name, p in module.named_parameters() if type(p).__name__ in _QUANTIZED_PARAMETERS]


def pipeline_quantization_config(bits: int | None, compute_dtype: torch.dtype = torch.bfloat16):
    """
    diffusers' `PipelineQuantizationConfig` that loads `SelfForcingPipeline`'s transformer in `bits` = 4 (NF4, double
    quantisation, `compute_dtype` matmuls: QLoRA) or 8 bits with bitsandbytes, the other components unchanged; `None`
    for `bits=None`. diffusers quantises only on a GPU (CUDA, XPU or MPS).
    """
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"`bits={bits}`: the base transformer can be loaded in 4 or 8 bits (or None, unquantised).")
    require_bitsandbytes(f"Loading the transformer in {bits} bits")
    from diffusers import PipelineQuantizationConfig

    if bits == 4:
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                      bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
        backend = "bitsandbytes_4bit"
    else:
        kwargs, backend = dict(load_in_8bit=True), "bitsandbytes_8bit"
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=["transformer"]
    )
