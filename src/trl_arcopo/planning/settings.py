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
"""The run's settings a plan reads ([`RunSettings`]: from an `ARCoPOConfig`, a YAML or overrides) and the precision they imply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..run_checks import SUB_BATCH_FIELDS, check_group_settings
from .inputs import DEFAULT_LORA_TARGETS, SELF_FORCING_NUM_STEPS


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
        loss_type (`str`): a registered loss ([`~trl_arcopo.loss.LossStrategy`]): `"arcopo"`, `"sde_grpo"` (trains
            `T - 1` steps by default), ...
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
        check_group_settings(  # the config's rules ([`~trl_arcopo.run_checks`])
            self.num_generations, self.num_anchors, self.num_iterations, self.per_device_train_batch_size, self.beta,
            self.train_denoising_steps, **{name: getattr(self, name) for name in SUB_BATCH_FIELDS},
        )  # fmt: skip
        checks = [
            ("num_processes", self.num_processes >= 1, "at least 1"),
            ("num_denoising_steps", self.num_denoising_steps >= 1, "at least 1"),
            ("lora_r", self.lora_r >= 1, "at least 1"),
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
        self.loss.check(num_steps=self.num_denoising_steps)  # a registered loss that can train this schedule
        if self.training_mode != "on_policy":
            raise ValueError(
                f"`training_mode={self.training_mode!r}`: the plan covers on-policy iterations (one rollout and its "
                "inner updates); plan with `training_mode='on_policy'` (a semi-on-policy step costs one update plus "
                "the reference forwards and the prefix rebuild of the drawn groups)."
            )
        if max(self.trained_steps) >= self.num_denoising_steps:
            raise ValueError(
                f"`train_denoising_steps={list(self.trained_steps)}` must be step indices in "
                f"[0, {self.num_denoising_steps})."
            )

    @property
    def loss(self):
        """The registered [`~trl_arcopo.loss.LossStrategy`] of `loss_type`."""
        from ..loss import get_loss_strategy  # torch, imported when a plan is made

        return get_loss_strategy(self.loss_type)

    @property
    def trained_steps(self) -> tuple[int, ...]:
        if self.train_denoising_steps is not None:
            return tuple(sorted(set(self.train_denoising_steps)))
        return tuple(range(self.loss.trainable_steps(self.num_denoising_steps)))

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
