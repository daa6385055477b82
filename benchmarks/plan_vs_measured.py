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
`trl_arcopo.planning.plan` against measurements of the same iteration on CPU, phase by phase.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/plan_vs_measured.py    # tiny and small, fp32, checkpointing off and on: ~3 min
    OMP_NUM_THREADS=1 python benchmarks/plan_vs_measured.py --precision bf16 --targets default

(The counts do not depend on the thread count; one thread avoids the slowdown of two spinning threads on a busy
machine.)

For each model of `benchmarks/rollout.py` (`tiny`, `small`) and a fixed pivot it builds an `ARCoPOTrainer`, rolls out
one group (`generate_and_score`) and runs one inner update (`accumulate_gradients`), and measures:

- **chunk passes** by phase, with a forward pre-hook on the transformer (a call on `n` chunks counts `n`; batch `B`
  is the prefix, `B·G` the branches, calls under autograd the update, the others during the update the reference);
- **FLOPs** by phase with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention, forward
  and backward; the CPU flash-attention kernels are registered with the formulas torch uses for the CUDA ones);
- **memory**: the peak of the running total of the CPU allocator's allocations minus frees during each phase, from
  `torch.profiler` with `profile_memory=True` (every allocation event carries its size), relative to the start of
  the phase; and the activations: the bytes still allocated after one `compute_loss` (what autograd keeps for the
  backward of one trained denoising step).

The plan's numbers for the same settings are printed next to them with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from datasets import Dataset
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.planning import DEFAULT_LORA_TARGETS, VideoShape, plan
from trl_arcopo.rollout_group import AnchorBatch
from trl_arcopo.testing_utils import cpu_allocations


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import CONFIGS, build  # the same model sizes as the rollout benchmark
from train_step import redness  # the same reward as the iteration benchmark


TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],  # benchmarks/train_step.py's adapter
    "default": list(DEFAULT_LORA_TARGETS),  # the trainer's default adapter (attention and feed-forward)
}
PROMPT = "a red fox jumps"
aten = torch.ops.aten


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP formulas (those of `FlopCounterMode`), plus the CPU flash-attention kernels counted like the CUDA ones
FLOP_FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_attention),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_cpu_attention_backward),
}


class FlopCounter(TorchDispatchMode):
    """
    `FlopCounterMode`'s count (matmuls, convolutions, attention) without its per-module bookkeeping, which costs more
    than the tiny model's forward; `total` accumulates over every use.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@dataclass
class Setup:
    config: str = "tiny"
    num_generations: int | None = None  # None: the config's group size
    num_anchors: int = 4
    pivot: int = 2
    lora_r: int = 16
    targets: str = "attention"  # a key of TARGETS
    checkpointing: bool = False
    # "fp32"; "bf16": bf16 weights and autocast (`torch_dtype: bfloat16` with `bf16: true`, the GPU setting);
    # "bf16-weights": bf16 weights without autocast (`bf16: false`)
    precision: str = "fp32"
    num_denoising_steps: int = 4
    rollout_batch_size: int | None = None  # the memory knobs of `ARCoPOConfig`
    anchor_batch_size: int | None = None
    output_dir: str = "outputs/plan_vs_measured"


def _to_bf16(transformer: torch.nn.Module) -> None:
    """bf16 weights except the modules diffusers keeps in fp32 (as `from_pretrained(torch_dtype=torch.bfloat16)`)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its note about the fp32 modules: they are put back just below
    transformer.to(torch.bfloat16)
    diffusers_logging.set_verbosity(verbosity)
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for name, module in transformer.named_modules():
        if any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep):
            module.float()


def build_trainer(setup: Setup) -> tuple[ARCoPOTrainer, dict]:
    """The trainer of `setup` on the model of `benchmarks/rollout.py`, and the plan's inputs for it."""
    cfg = CONFIGS[setup.config]
    pipe = build(cfg)
    if setup.precision != "fp32":
        _to_bf16(pipe.transformer)
    g = setup.num_generations or cfg["group_size"]
    sigmas = [1.0, 0.75, 0.5, 0.25][: setup.num_denoising_steps]
    args = ARCoPOConfig(
        output_dir=setup.output_dir, max_steps=1, per_device_train_batch_size=1, num_generations=g,
        num_anchors=setup.num_anchors, num_iterations=1, pivot_chunk=setup.pivot, denoising_sigmas=sigmas,
        activation_checkpointing=setup.checkpointing, bf16=setup.precision == "bf16", report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, rollout_batch_size=setup.rollout_batch_size,
        anchor_batch_size=setup.anchor_batch_size,
    )  # fmt: skip
    trainer = ARCoPOTrainer(
        pipeline=pipe,
        reward_funcs=[redness],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [PROMPT]}),
        peft_config=LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, target_modules=TARGETS[setup.targets]),
    )
    plan_inputs = dict(
        config=dict(
            num_generations=g, num_anchors=setup.num_anchors, num_iterations=1, pivot_chunk=setup.pivot,
            denoising_sigmas=sigmas, lora_r=setup.lora_r, lora_target_modules=TARGETS[setup.targets],
            activation_checkpointing=setup.checkpointing, bf16=setup.precision == "bf16",
            torch_dtype="float32" if setup.precision == "fp32" else "bfloat16",
            rollout_batch_size=setup.rollout_batch_size, anchor_batch_size=setup.anchor_batch_size,
        ),
        transformer_config=pipe.transformer.config,
        video=VideoShape.from_pipeline(pipe),
        transformer_parameters_count=sum(p.numel() for p in pipe.transformer.parameters() if not p.requires_grad),
    )  # fmt: skip
    return trainer, plan_inputs


def allocator_peak(fn):
    """
    Run `fn()` under `torch.profiler` and return `(result, peak, net)`: the largest running total of allocated minus
    freed CPU bytes during the call and the total at its end, both relative to its start.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    total = peak = 0
    for size in cpu_allocations(prof):
        total += size
        peak = max(peak, total)
    return out, peak, total


class PhaseCounter:
    """Counts chunk passes and FLOPs of every transformer call, by phase (see the module docstring)."""

    def __init__(self, transformer, num_generations: int, flop_counter: FlopCounter):
        self.g, self.flops = num_generations, flop_counter
        self.passes, self.forward_flops, self.in_update = {}, {}, False
        self._start = 0
        self.handles = [
            transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            transformer.register_forward_hook(self._post, with_kwargs=True),
        ]

    def _phase(self, kwargs) -> str:
        if self.in_update:
            return "update" if torch.is_grad_enabled() else "reference"
        cache = kwargs.get("kv_cache")
        return "branches" if cache is not None and cache.prefix is not None else "prefix"  # branches read a prefix

    def _pre(self, module, args, kwargs):
        self._start = self.flops.total

    def _post(self, module, args, kwargs, output):
        phase = self._phase(kwargs)
        self.passes[phase] = self.passes.get(phase, 0) + args[0].shape[0]
        self.forward_flops[phase] = self.forward_flops.get(phase, 0) + self.flops.total - self._start

    def remove(self):
        for h in self.handles:
            h.remove()


def measure(setup: Setup) -> tuple[dict, object]:
    """Measure one rollout and one inner update of `setup`; returns `(measured, plan)`."""
    torch.manual_seed(0)
    trainer, inputs = build_trainer(setup)
    predicted = plan(gpu="h100", **inputs)
    transformer = trainer.pipeline.transformer
    flop_counter = FlopCounter()
    counter = PhaseCounter(transformer, trainer.args.num_generations, flop_counter)
    rows = [{"prompt": PROMPT}]
    measured = {}
    # `trainer.train()` runs every transformer forward under accelerate's autocast when `bf16=True`; so do we
    autocast = trainer.accelerator.autocast
    try:
        with autocast():  # a first rollout: one-time allocations (kernel caches, the prompt's embeddings) happen here
            trainer.generate_and_score(rows)
        counter.passes.clear(), counter.forward_flops.clear()
        start = time.perf_counter()
        with flop_counter, autocast():
            group, peak, _ = allocator_peak(lambda: trainer.generate_and_score(rows))
        measured["rollout_seconds"] = time.perf_counter() - start
        measured["rollout_peak"] = peak
        counter.in_update = True
        before = flop_counter.total
        start = time.perf_counter()
        with flop_counter, autocast():
            _, peak, _ = allocator_peak(lambda: trainer.accumulate_gradients(group))
        measured["update_seconds"] = time.perf_counter() - start
        measured["update_peak"] = peak
        update_total = flop_counter.total - before
    finally:
        counter.remove()
    measured["passes"] = dict(counter.passes)
    measured["forward_flops"] = dict(counter.forward_flops)
    measured["backward_flops"] = {"update": update_total - counter.forward_flops.get("update", 0)}

    # activations kept for the backward of one trained step (the first iteration's anchors, step 0)
    transformer.zero_grad(set_to_none=True)
    anchors = AnchorBatch.draw(group, setup.num_anchors, torch.Generator().manual_seed(0), iteration=0)
    anchors = anchors.sub_batches(setup.anchor_batch_size)[0]  # one forward's anchors
    with autocast():
        loss, _, kept = allocator_peak(lambda: trainer.compute_loss(trainer.model, replace(anchors, step=0)))
    measured["activations"] = kept
    _, backward_peak, _ = allocator_peak(loss.backward)
    measured["backward_peak"] = backward_peak
    return measured, predicted


def compare(measured: dict, p) -> list[tuple[str, float, float]]:
    """`(quantity, predicted, measured)` rows."""
    rows = []
    for phase in ("prefix", "branches", "update", "reference"):
        if phase in measured["passes"] or phase in [x.name for x in p.phases]:
            predicted = p.phase(phase) if phase in [x.name for x in p.phases] else None
            rows.append(
                (
                    f"{phase}: chunk passes",
                    predicted.chunk_forwards if predicted else 0,
                    measured["passes"].get(phase, 0),
                )
            )
            rows.append(
                (
                    f"{phase}: forward FLOPs",
                    predicted.forward_flops if predicted else 0,
                    measured["forward_flops"].get(phase, 0),
                )
            )
    rows.append(("update: backward FLOPs", p.phase("update").backward_flops, measured["backward_flops"]["update"]))
    rows.append(("rollout: peak bytes", p.rollout_peak_bytes(), measured["rollout_peak"]))
    ckpt = p.settings.gradient_checkpointing
    act = p.activations[ckpt]
    fixed = sum(
        m.bytes
        for m in p.memory
        if m.phase == "update" and not m.name.startswith(("activations of one trained step", "backward workspace"))
    )
    rows.append(("update: activations (one step)", act.saved, measured["activations"]))
    rows.append(("update: peak bytes", fixed + act.saved + act.backward_workspace, measured["update_peak"]))
    return rows


def print_rows(title: str, rows) -> None:
    print(f"\n{title}")
    print(f"{'quantity':<34} {'predicted':>14} {'measured':>14} {'pred/meas':>9}")
    for name, pred, meas in rows:
        ratio = pred / meas if meas else float("nan")
        fmt = (
            (lambda x: f"{x / 2**20:11.2f} MiB")
            if "bytes" in name or "activations" in name
            else (lambda x: f"{x:14.4g}")
        )
        print(f"{name:<34} {fmt(pred):>14} {fmt(meas):>14} {ratio:9.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-weights"])
    parser.add_argument("--pivot", type=int, default=2)
    parser.add_argument("--targets", default="attention", choices=list(TARGETS), help="The LoRA's target modules.")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--rollout_batch_size", type=int, default=None, help="Branches per rollout forward.")
    parser.add_argument("--anchor_batch_size", type=int, default=None, help="Anchors per update forward.")
    parser.add_argument("--output", default=None, help="Write every row as JSON here.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}")
    results = []
    for name in args.configs:
        for ckpt in args.checkpointing:
            setup = Setup(
                config=name,
                pivot=args.pivot,
                checkpointing=ckpt == "on",
                precision=args.precision,
                targets=args.targets,
                rollout_batch_size=args.rollout_batch_size,
                anchor_batch_size=args.anchor_batch_size,
            )
            measured, p = measure(setup)
            rows = compare(measured, p)
            title = (
                f"[{name}] G={p.settings.num_generations}, K={p.settings.num_anchors}, pivot {setup.pivot} of "
                f"{p.video.num_chunks}, LoRA r={setup.lora_r} ({setup.targets}), checkpointing {ckpt}, {args.precision}, "
                f"rollout_batch_size {setup.rollout_batch_size}, anchor_batch_size {setup.anchor_batch_size} "
                f"(rollout {measured['rollout_seconds']:.1f} s, update {measured['update_seconds']:.1f} s)"
            )
            print_rows(title, rows)
            results.append({"config": name, "checkpointing": ckpt, "rows": rows})
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
