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
The `trl-arcopo` command and its subcommands:

- `trl-arcopo reward-server REWARD [--host H] [--port N] [--kwargs JSON] [--max-concurrency N]`: serve a reward
  function over HTTP ([`~trl_arcopo.rewards.server.serve`]); `REWARD` is a name with its options
  (`videoalign:checkpoints/VideoReward?device=cuda:1`) or `MODULE:CALLABLE`.
- `trl-arcopo plan CONFIG.yaml [--preset NAME] [--gpu GPU ...] [--grid] [--json]`: predict the FLOPs, memory and
  time of one iteration before a launch ([`~trl_arcopo.planning.plan`]).

A subcommand is a function `_add_<name>(subparsers)` that adds its parser and sets `run=<function of the parsed
arguments>`; `main` lists them in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable


def load_callable(spec: str, kwargs: dict | None = None) -> Callable:
    """
    The reward `spec` names, built with the options `kwargs` ([`~trl_arcopo.rewards.registry.load_reward_func`]): a
    reward name with its options (`videoalign:checkpoints/VideoReward?dimensions=MQ`, `motion_magnitude?scale=10`,
    ...) or `MODULE:CALLABLE` (`CALLABLE` may be dotted: `module:Class.attribute`). A class is instantiated with
    `kwargs`; with `kwargs`, a function is called with them to build the reward (a factory, e.g.
    `trl_arcopo.rewards.base:load_reward_func` with `{"name": "sharpness"}`); without, a function is the reward itself.
    A malformed `spec`, an unknown name or option, or a missing module or attribute raises a `ValueError`, a missing
    path a `FileNotFoundError`, an object that cannot be built or is not callable a `TypeError`, each naming `spec`.
    """
    from .rewards.registry import load_reward_func

    return load_reward_func(spec, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------- reward-server
def _add_reward_server(subparsers) -> None:
    from .rewards.server_limits import ServerLimits

    parser = subparsers.add_parser(
        "reward-server",
        help="Serve a reward function over HTTP (POST /score, GET /health).",
        description="Serve a reward function over HTTP, for `trl_arcopo.rewards.RewardServerClient`.",
    )
    parser.add_argument(
        "reward", metavar="REWARD",
        help="a reward name with its options, e.g. 'videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA' or "
        "'motion_magnitude?scale=10' (docs/rewards.md, 'Rewards by name'), or MODULE:CALLABLE, e.g. "
        "trl_arcopo.rewards.base:redness (a class is instantiated).",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one).")
    parser.add_argument("--kwargs", default=None, help="JSON object of keyword arguments, e.g. '{\"scale\": 10}'.")
    for limit in dataclasses.fields(ServerLimits):  # one flag per limit, its default and help from the dataclass
        flag = "--" + limit.name.replace("_", "-")
        kind = int if limit.type in ("int", int) else float
        parser.add_argument(
            flag, type=kind, default=limit.default, help=f"{limit.metadata['help']} (default {limit.default:g})."
        )
    parser.add_argument(
        "--api-key", default=None,
        help="bearer token every request must carry (default: the environment variable "
        "TRL_ARCOPO_REWARD_SERVER_API_KEY, if set; prefer it, a flag shows in the process list).",
    )  # fmt: skip

    def run(args: argparse.Namespace) -> None:
        try:
            from .rewards.server import RewardServer
        except ImportError as error:
            parser.error(str(error))
        example = "'{\"scale\": 10}'"
        try:
            kwargs = json.loads(args.kwargs) if args.kwargs is not None else None
        except json.JSONDecodeError as error:
            parser.error(f"--kwargs {args.kwargs!r} is not JSON ({error}): give an object, e.g. {example}.")
        if kwargs is not None and not isinstance(kwargs, dict):
            parser.error(f"--kwargs {args.kwargs!r} is not a JSON object: give an object, e.g. {example}.")
        try:
            limits = ServerLimits(
                **{limit.name: getattr(args, limit.name) for limit in dataclasses.fields(ServerLimits)}
            )
        except ValueError as error:
            parser.error(f"{error} (flags use dashes: --max-body-mb, ...)")
        try:
            reward = load_callable(args.reward, kwargs)
        except (ValueError, TypeError, OSError, ImportError) as error:  # OSError: a missing path
            parser.error(str(error))
        try:
            server = RewardServer(reward, args.host, args.port, limits, args.api_key)
        except ValueError as error:
            parser.error(str(error))
        sys.stdout.write(f"Serving reward `{server.name}` on {server.url} (POST /score, GET /health)\n")
        sys.stdout.flush()
        server.run()

    parser.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class PlanArguments:
    """What `trl-arcopo plan` reports, and on which GPUs (the run itself is the YAML and [`PlanOverrides`])."""

    preset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "The generator, instead of the YAML's pipeline_name_or_path (self-forcing-1.3b: "
                  "Wan2.1-T2V-1.3B); see docs/planning.md for the presets."},
    )  # fmt: skip
    gpu: list[str] = dataclasses.field(default_factory=lambda: ["h100"], metadata={"help": "One or more GPUs."})
    mfu: float = dataclasses.field(default=0.35, metadata={"help": "Assumed model FLOPs utilisation, in (0, 1]."})
    num_processes: int | None = dataclasses.field(default=None, metadata={"help": "Data-parallel processes (1)."})
    fit: bool = dataclasses.field(
        default=False,
        metadata={"help": "Print the fastest setting of gradient checkpointing, rollout_batch_size, anchor_batch_size "
                  "and offload_text_encoder that fits each GPU."},
    )  # fmt: skip
    headroom: float = dataclasses.field(default=0.15, metadata={"help": "--fit: the share of GPU memory left free."})
    grid: bool = dataclasses.field(
        default=False,
        metadata={"help": "One row per GPU x gradient checkpointing on/off x optimizer (the config's, 8-bit AdamW)."},
    )
    json: str | None = dataclasses.field(default=None, metadata={"help": "Also write the plan(s) as JSON here."})


@dataclasses.dataclass
class PlanOverrides:
    """Settings of the run that a flag overrides over the YAML's (`None`: the YAML's, else the default)."""

    num_generations: int | None = None
    num_anchors: int | None = None
    num_iterations: int | None = None
    per_device_train_batch_size: int | None = None
    lora_r: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_frames_per_chunk: int | None = None
    pivot_chunk: int | None = None
    beta: float | None = None
    optim: str | None = None
    torch_dtype: str | None = dataclasses.field(default=None, metadata={"choices": ["float32", "bfloat16", "float16"]})
    mixed_precision: str | None = dataclasses.field(default=None, metadata={"choices": ["no", "bf16", "fp16"]})
    gradient_checkpointing: bool | None = None
    offload_text_encoder: bool | None = None
    split_groups_across_processes: bool | None = None
    rollout_batch_size: int | None = None
    anchor_batch_size: int | None = None
    decode_batch_size: int | None = None
    reward_window_chunks: int | None = None
    reward_context_chunks: int | None = None


#: Settings of the video, which the planner reads from the config rather than as overrides of the run.
_VIDEO_SETTINGS = ("height", "width", "num_frames", "num_frames_per_chunk")


def _add_plan(subparsers) -> None:
    subparsers.add_parser(
        "plan",
        add_help=False,  # `trl-arcopo plan --help` is the help of its own parser ([`_plan_parser`])
        help="Predict FLOPs, memory and seconds of one AR-CoPO iteration on a GPU (no weights are loaded).",
    ).set_defaults(run=_run_plan)


def _plan_parser():
    from trl import TrlParser

    from .planning import GPUS, PRESETS

    parser = TrlParser(
        (PlanArguments, PlanOverrides), prog="trl-arcopo plan", usage="trl-arcopo plan [CONFIG.yaml] [--flags]",
        description="Predict, from a config alone, one AR-CoPO iteration (one rollout and its inner updates) per "
        "process: transformer FLOPs by phase, KV-cache, activation, parameter and optimizer bytes, the peak memory, "
        "and seconds at an assumed MFU. CONFIG.yaml is a YAML of examples/train_arcopo.py; each flag overrides its "
        "setting. See docs/planning.md.",
    )  # fmt: skip
    for action in parser._actions:  # the choices live in the planning tables, not in the dataclass
        if action.dest == "preset":
            action.choices = sorted(PRESETS)
        elif action.dest == "gpu":
            action.choices = sorted(GPUS)
    return parser


def _run_plan(args: argparse.Namespace) -> None:
    from .planning import OPTIMIZERS_8BIT, fit, fit_report, grid_table, load_yaml, plan_config

    argv = list(args.plan_argv)
    path = argv.pop(0) if argv and not argv[0].startswith("-") else None
    parser = _plan_parser()
    options, flags = parser.parse_args_into_dataclasses(argv)
    overrides = {k: v for k, v in dataclasses.asdict(flags).items() if v is not None and k not in _VIDEO_SETTINGS}
    if options.fit and options.grid:
        parser.error("--fit and --grid are two reports; pass one of them.")
    if not 0 < options.mfu <= 1:
        parser.error(f"--mfu {options.mfu} must be in (0, 1], e.g. 0.35.")
    try:
        config = load_yaml(path) if path else {}
        config |= {k: getattr(flags, k) for k in _VIDEO_SETTINGS if getattr(flags, k) is not None}
        common = dict(mfu=options.mfu, num_processes=options.num_processes)
        if options.fit:
            fits = {gpu: fit(config, options.preset, gpu=gpu, headroom=options.headroom, **common, **overrides)
                    for gpu in options.gpu}  # fmt: skip
        variants = [{}]
        if options.grid:
            optim = overrides.get("optim") or config.get("optim") or "adamw_torch"
            optims = [optim] + [o for o in (OPTIMIZERS_8BIT[0],) if o != optim]
            variants = [{"gradient_checkpointing": c, "optim": o} for c in (False, True) for o in optims]
        plans = [
            plan_config(config, options.preset, gpu=gpu, **common, **{**overrides, **variant})
            for gpu in options.gpu
            for variant in variants
        ]
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    if options.fit:
        sys.stdout.write("\n".join(fit_report(best, tried, options.headroom) for best, tried in fits.values()))
        plans = [best for best, _ in fits.values() if best is not None]
    elif options.grid:
        sys.stdout.write(plans[0].summary(per_run=False) + "\n" + grid_table(plans))
        for gpu in dict.fromkeys(p.gpu.name for p in plans):
            over = [p for p in plans if p.gpu.name == gpu and not p.fits]
            if over:  # the warning of the row that comes closest says what still does not fit
                count = sum(p.gpu.name == gpu for p in plans)
                closest = min(over, key=lambda p: p.peak_memory_bytes)
                sys.stdout.write(f"> WARNING: {len(over)} of {count} rows do not fit; {closest.warnings[0]}\n")
    else:
        sys.stdout.write("\n".join(p.to_markdown() for p in plans))
    if options.json:
        with open(options.json, "w") as f:
            json.dump([p.to_dict() for p in plans], f, indent=1)


SUBCOMMANDS = [_add_reward_server, _add_plan]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point `trl-arcopo` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="trl-arcopo", description="trl_arcopo commands.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args, rest = parser.parse_known_args(argv)
    if args.command == "plan":  # the rest is parsed by the subcommand's own `TrlParser` ([`_plan_parser`])
        args.plan_argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
