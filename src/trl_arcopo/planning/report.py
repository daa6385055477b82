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
"""A plan and its report: phases, memory items, and the markdown and JSON a plan prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .costs import ActivationEstimate
from .inputs import GiB, GPUSpec, MiB, TransformerShape, VideoShape
from .settings import RunSettings


# ---------------------------------------------------------------------------------------------------- the plan
def format_bytes(n: float) -> str:
    """`n` bytes in GiB, or MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.2f} MiB"


def format_flops(n: float) -> str:
    """`n` FLOP in TFLOP, or GFLOP below one TFLOP."""
    if n == 0:
        return "0"
    return f"{n / 1e12:.2f} TFLOP" if abs(n) >= 1e12 else f"{n / 1e9:.3f} GFLOP"


def _format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _format_seconds(s: float) -> str:
    return f"{s:.2f}" if s >= 0.01 else f"{s:.2e}"


@dataclass
class PhaseCost:
    r"""
    The transformer work of one phase of one iteration, per process.

    Args:
        name (`str`): `"prefix"`, `"branches"`, `"update"` or `"reference"`.
        chunk_forwards (`float`): transformer passes counted in chunk-videos (a call on `n` chunks counts `n`); for
            `"update"` each is a forward and its backward. An expectation over the pivot when it is uniform.
        forward_flops, backward_flops (`float`): matmul FLOPs.
        seconds (`float`): at the plan's MFU against the GPU's peak.
    """

    name: str
    chunk_forwards: float
    forward_flops: float
    backward_flops: float = 0.0
    seconds: float = 0.0

    @property
    def flops(self) -> float:
        return self.forward_flops + self.backward_flops


@dataclass
class MemoryItem:
    r"""
    Bytes of one thing on the device. `phase` says when it is alive: `"persistent"` (the whole run), `"kept"` (made by
    the rollout, alive during the update), `"rollout"` (during the forward of the rollout's last chunk), `"rollout
    end"` (when `sample_group` finishes the group), `"decode"` (the decoded videos) or `"update"` (the inner updates).
    The items of one phase are alive together; the peak takes the largest phase.
    """

    name: str
    bytes: int
    phase: str


@dataclass
class Plan:
    r"""
    The predicted cost of one AR-CoPO iteration (one rollout and `num_iterations` inner updates) on one process.

    Args:
        settings ([`RunSettings`]), transformer ([`TransformerShape`]), video ([`VideoShape`]), gpu ([`GPUSpec`]).
        mfu (`float`): the assumed model FLOPs utilisation.
        pivot (`int` or `None`): the fork point costed (`None`: expectation over a uniform pivot).
        memory_pivot (`int`): the pivot whose memory is reported (the worst one when the pivot is uniform).
        phases (`list[PhaseCost]`).
        memory (`list[MemoryItem]`).
        activations (`dict[bool, ActivationEstimate]`): with (`True`) and without (`False`) gradient checkpointing.
        peak_bytes (`dict[bool, int]`): the process's predicted peak, with and without gradient checkpointing.
        parameters (`dict[str, int]`): transformer, LoRA, text encoder, VAE.
        warnings (`list[str]`): e.g. a peak above the GPU's memory.
        branch_cache_bytes (`int`): the branches' KV cache of one forward at its largest over the pivots (the
            earliest for `full`; the same at every pivot but the last for `rolling` and `recompute`).
    """

    settings: RunSettings
    transformer: TransformerShape
    video: VideoShape
    gpu: GPUSpec
    mfu: float
    pivot: int | None
    memory_pivot: int
    phases: list[PhaseCost]
    memory: list[MemoryItem]
    activations: dict[bool, ActivationEstimate]
    peak_bytes: dict[bool, int]
    parameters: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    branch_cache_bytes: int = 0

    # -------------------------------------------------------------- derived numbers
    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def peak_memory_bytes(self) -> int:
        """The peak with the settings' gradient checkpointing."""
        return self.peak_bytes[self.settings.gradient_checkpointing]

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.gpu.memory_bytes

    def phase(self, name: str) -> PhaseCost:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"No phase {name!r}; the phases are {[p.name for p in self.phases]}.")

    def memory_by_phase(self, phase: str) -> int:
        return sum(item.bytes for item in self.memory if item.phase == phase)

    def rollout_peak_bytes(self, decode: bool = True) -> int:
        """
        The rollout's peak above the persistent memory: what it keeps for the update plus its largest moment (the
        forward of the last chunk, the end of `sample_group`, or, with `decode`, the decoded videos).
        """
        phases = ("rollout", "rollout end", "decode") if decode else ("rollout", "rollout end")
        return self.memory_by_phase("kept") + max(self.memory_by_phase(p) for p in phases)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every number."""
        out = {
            "settings": asdict(self.settings),
            "transformer": asdict(self.transformer),
            "video": asdict(self.video),
            "gpu": asdict(self.gpu),
            "mfu": self.mfu,
            "pivot": self.pivot,
            "memory_pivot": self.memory_pivot,
            "phases": [{**asdict(p), "flops": p.flops} for p in self.phases],
            "memory": [asdict(m) for m in self.memory],
            "activations": {
                ("with" if k else "without") + "_checkpointing": asdict(v) for k, v in self.activations.items()
            },
            "peak_bytes": {("with" if k else "without") + "_checkpointing": v for k, v in self.peak_bytes.items()},
            "peak_memory_bytes": self.peak_memory_bytes,
            "fits": self.fits,
            "flops": self.flops,
            "seconds": self.seconds,
            "parameters": self.parameters,
            "warnings": list(self.warnings),
        }
        return json.loads(json.dumps(out, default=list))

    def summary(self, per_run: bool = True) -> str:
        """
        The title and settings of the plan; `per_run=False` leaves out the GPU, checkpointing and optimizer (a table
        whose rows vary them follows).
        """
        s, v, t = self.settings, self.video, self.transformer
        tpf = v.tokens_per_frame(t)
        pivot = "uniform (expectation)" if self.pivot is None else str(self.pivot)
        precision = s.torch_dtype + (f" + {s.mixed_precision} autocast" if s.mixed_precision else "")
        title = f"{self.gpu.name}, MFU {self.mfu:.0%}" if per_run else f"MFU {self.mfu:.0%}"
        lines = [
            f"## AR-CoPO iteration plan: {title}",
            "",
            (
                f"- transformer: {t.num_layers} layers, {t.num_attention_heads}x{t.attention_head_dim} heads, FFN "
                f"{t.ffn_dim}, patch {tuple(t.patch_size)}; {_format_count(self.parameters['transformer'])} "
                f"parameters ({precision})"
            ),
            (
                f"- video: {v.height}x{v.width}x{v.num_frames} -> latent {v.latent_frames}x{v.latent_height}x"
                f"{v.latent_width}, {v.num_chunks} chunks of {v.num_frames_per_chunk} "
                f"({v.num_frames_per_chunk * tpf} tokens), {v.max_sequence_length} text tokens; {v.describe_cache()}"
            ),
            (
                f"- G={s.num_generations}, anchors={s.num_anchors}, {s.num_denoising_steps} denoising steps "
                f"({len(s.trained_steps)} trained), num_iterations={s.num_iterations}, "
                f"{s.per_device_train_batch_size} prompt(s) per process, {s.num_processes} process(es)"
                + (", groups split across them" if s.split_groups_across_processes else "")
                + (", the transformer sharded over them (FSDP)" if s.fsdp else "")
                + f", pivot {pivot}"
            ),
            f"- LoRA r={s.lora_r} on {self._targets()} ({_format_count(self.parameters['lora'])} parameters)"
            + (
                f"; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; optimizer {s.optim}"
                if per_run
                else ""
            )
            + (f"; beta={s.beta}" if s.beta > 0 else ""),
        ]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """A report: the settings, FLOPs and seconds by phase, memory by item and the peaks, and warnings."""
        s = self.settings
        lines = [
            self.summary(),
            "| phase | chunk passes | forward | backward | seconds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for p in self.phases:
            lines.append(
                f"| {p.name} | {p.chunk_forwards:.1f} | {format_flops(p.forward_flops)} | "
                f"{format_flops(p.backward_flops)} | {_format_seconds(p.seconds)} |"
            )
        total = self.flops * s.num_processes
        lines.append(
            f"| **iteration** | | {format_flops(sum(p.forward_flops for p in self.phases))} | "
            f"{format_flops(sum(p.backward_flops for p in self.phases))} | **{_format_seconds(self.seconds)}** |"
        )
        if s.num_processes > 1:
            lines += ["", f"All {s.num_processes} processes together: {format_flops(total)} per iteration."]
        lines += [
            "",
            f"Memory per process at pivot {self.memory_pivot}, the one with the highest peak:",
            "",
            "| item | phase | bytes |",
            "| --- | --- | ---: |",
        ]
        lines += [f"| {m.name} | {m.phase} | {format_bytes(m.bytes)} |" for m in self.memory]
        for ckpt in (False, True):
            a = self.activations[ckpt]
            mark = " (selected)" if ckpt == s.gradient_checkpointing else ""
            lines.append(
                f"| **peak, checkpointing {'on' if ckpt else 'off'}{mark}** (activations {format_bytes(a.saved)} + "
                f"backward {format_bytes(a.backward_workspace)}) | | **{format_bytes(self.peak_bytes[ckpt])}** |"
            )
        lines.append(f"| GPU memory | | {format_bytes(self.gpu.memory_bytes)} |")
        if self.warnings:
            lines += ["", *[f"> WARNING: {w}" for w in self.warnings]]
        return "\n".join(lines) + "\n"

    def _targets(self) -> str:
        t = self.settings.lora_target_modules
        return t if isinstance(t, str) else ", ".join(t)
