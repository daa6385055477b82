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

The package: `inputs` (GPUs, transformer and video shapes, presets), `settings` (the run's settings), `costs` (the
LoRA layout, parameter counts, FLOPs and saved activations of one pass), `report` (a plan and its report), `planner`
([`plan`]), and here the front end on configs and pipelines ([`plan_config`], [`fit`], [`GeneratorProfile`]).

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

from ..attention_window import check_cache_policy
from .costs import (
    ActivationEstimate,
    _LoRALayout,
    _Pass,
    activation_bytes,
    backward_flops,
    count_parameters,
    forward_flops,
    forward_workspace,
    transformer_parameters,
    wan_block_parameters,
    wan_transformer_parameters,
)
from .inputs import (
    DEFAULT_LORA_TARGETS,
    GPUS,
    PRESETS,
    SELF_FORCING_NUM_STEPS,
    UMT5_XXL_ENCODER,
    UMT5_XXL_PARAMETERS,
    WAN_2_1_T2V_1_3B,
    WAN_2_1_T2V_14B,
    WAN_2_1_VAE_PARAMETERS,
    GiB,
    GPUSpec,
    ModelPreset,
    TransformerShape,
    VideoShape,
    get_gpu,
    get_preset,
)
from .planner import (
    optimizer_bytes,
    plan,
)
from .report import (
    MemoryItem,
    PhaseCost,
    Plan,
    format_bytes,
    format_flops,
)
from .settings import (
    DTYPE_BYTES,
    OPTIMIZERS_8BIT,
    RunSettings,
)


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DTYPE_BYTES",
    "GPUS",
    "OPTIMIZERS_8BIT",
    "PRESETS",
    "SELF_FORCING_NUM_STEPS",
    "UMT5_XXL_ENCODER",
    "UMT5_XXL_PARAMETERS",
    "WAN_2_1_T2V_1_3B",
    "WAN_2_1_T2V_14B",
    "WAN_2_1_VAE_PARAMETERS",
    "ActivationEstimate",
    "GPUSpec",
    "GeneratorProfile",
    "MemoryItem",
    "ModelPreset",
    "PhaseCost",
    "Plan",
    "RunSettings",
    "TransformerShape",
    "VideoShape",
    "activation_bytes",
    "backward_flops",
    "count_parameters",
    "fit",
    "fit_report",
    "format_bytes",
    "format_flops",
    "forward_flops",
    "forward_workspace",
    "get_gpu",
    "get_preset",
    "grid_table",
    "load_yaml",
    "memory_knobs",
    "optimizer_bytes",
    "plan",
    "plan_config",
    "transformer_parameters",
    "wan_block_parameters",
    "wan_transformer_parameters",
]


# ---------------------------------------------------------------------------------------------------- configs and pipelines
@dataclass(frozen=True)
class GeneratorProfile:
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
    def from_preset(cls, name: str) -> GeneratorProfile:
        p = get_preset(name)
        return cls(p.transformer, p.video, p.text_encoder_parameters, p.vae_parameters, None, p.num_denoising_steps,
                   p.sampler)  # fmt: skip

    @classmethod
    def from_pipeline(cls, pipeline) -> GeneratorProfile:
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
    def from_folder(cls, path: str) -> GeneratorProfile:
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
    def resolve(cls, name_or_path: str | None, preset: str | None = None) -> GeneratorProfile:
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
            from ..testing_utils import tiny_pipeline

            return cls.from_pipeline(tiny_pipeline())
        if name == "moving-shapes":
            from ..shapes.pretrained import PRETRAINED_PATH

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
    generator: GeneratorProfile | str | None = None,
    *,
    gpu: str | GPUSpec = "h100",
    mfu: float = 0.35,
    num_processes: int | None = None,
    **overrides,
) -> Plan:
    """
    [`plan`] for a run config (a dict such as a YAML of `examples/train_arcopo.py`, or an [`ARCoPOConfig`]) on a
    generator: a [`GeneratorProfile`], a preset name, or `None` to resolve the config's `pipeline_name_or_path`.
    """
    config = {} if config is None else config
    if not isinstance(generator, GeneratorProfile):
        name = config.get("pipeline_name_or_path") if isinstance(config, Mapping) else None
        generator = GeneratorProfile.resolve(name, preset=generator)
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
    generator: GeneratorProfile | str | None = None,
    *,
    headroom: float = 0.15,
    **overrides,
) -> tuple[Plan | None, list[Plan]]:
    """
    The fastest setting of the memory knobs that fits the GPU: every combination of gradient checkpointing,
    `rollout_batch_size` (every branch at once, then `ceil(G / k)` for `k = 2, 3, ...`), `anchor_batch_size` and
    `offload_text_encoder` is planned ([`plan_config`]; `overrides` are its other arguments: `gpu`, `mfu`,
    `num_processes` and the other settings); among those whose peak leaves `headroom` of the GPU's memory free (the
    caching allocator reserves 5-15 % above the allocated bytes, and the VAE decoder, the reward models and the CUDA
    context are not in the plan), the one with the fewest seconds, then the fewest sub-batches, then the text encoder
    on the device. Returns `(best or None, every plan tried)`.
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
        return plan_config(config, generator, **knobs, **overrides)

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
