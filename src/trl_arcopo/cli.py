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
def _add_plan(subparsers) -> None:
    from .planning import GPUS, OPTIMIZERS_8BIT, PRESETS

    parser = subparsers.add_parser(
        "plan",
        help="Predict FLOPs, memory and seconds of one AR-CoPO iteration on a GPU (no weights are loaded).",
        description="Predict, from a config alone, one AR-CoPO iteration (one rollout and its inner updates) per "
        "process: transformer FLOPs by phase, KV-cache, activation, parameter and optimizer bytes, the peak memory, "
        "and seconds at an assumed MFU. See docs/planning.md.",
    )
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML of examples/train_arcopo.py (e.g. examples/configs/self_forcing.yaml).",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None,
        help="The generator, instead of the YAML's pipeline_name_or_path (self-forcing-1.3b: Wan2.1-T2V-1.3B).",
    )  # fmt: skip
    parser.add_argument("--gpu", nargs="+", default=["h100"], choices=sorted(GPUS), help="One or more GPUs.")
    parser.add_argument("--mfu", type=float, default=0.35, help="Assumed model FLOPs utilisation (default 0.35).")
    parser.add_argument("--num_processes", type=int, default=None, help="Data-parallel processes (default 1).")
    for name, kind in (
        ("num_generations", int), ("num_anchors", int), ("num_iterations", int), ("per_device_train_batch_size", int),
        ("lora_r", int), ("height", int), ("width", int), ("num_frames", int), ("num_frames_per_chunk", int),
        ("pivot_chunk", int), ("beta", float), ("optim", str), ("rollout_batch_size", int), ("anchor_batch_size", int),
        ("decode_batch_size", int), ("reward_window_chunks", int), ("reward_context_chunks", int),
    ):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"Override the config's `{name}`.")
    parser.add_argument("--torch_dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument(
        "--mixed_precision", choices=["no", "bf16", "fp16"], default=None, help="Autocast (bf16: true)."
    )
    parser.add_argument(
        "--gradient_checkpointing", choices=["true", "false"], default=None, help="Override activation checkpointing."
    )
    parser.add_argument(
        "--offload_text_encoder", choices=["true", "false"], default=None, help="Keep the text encoder on the CPU."
    )
    parser.add_argument(
        "--split_groups_across_processes", choices=["true", "false"], default=None,
        help="Each process rolls out G / num_processes of every group.",
    )  # fmt: skip
    parser.add_argument(
        "--fit", action="store_true",
        help="Print the fastest setting of gradient checkpointing, rollout_batch_size, anchor_batch_size and "
        "offload_text_encoder that fits each GPU.",
    )  # fmt: skip
    parser.add_argument(
        "--headroom", type=float, default=0.15, help="--fit: the share of the GPU's memory left free (default 0.15)."
    )
    parser.add_argument(
        "--grid", action="store_true",
        help=f"Print one row per GPU x gradient checkpointing on/off x optimizer (the config's, {OPTIMIZERS_8BIT[0]}).",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="Also write the plan(s) as JSON to this file.")

    def run(args: argparse.Namespace) -> None:

        from .planning import fit, fit_report, grid_table, load_yaml, plan_config

        overrides = {
            k: getattr(args, k)
            for k in ("num_generations", "num_anchors", "num_iterations", "per_device_train_batch_size", "lora_r",
                      "pivot_chunk", "beta", "optim", "torch_dtype", "mixed_precision", "rollout_batch_size",
                      "anchor_batch_size", "decode_batch_size", "reward_window_chunks", "reward_context_chunks")
            if getattr(args, k) is not None
        }  # fmt: skip
        for flag in ("gradient_checkpointing", "offload_text_encoder", "split_groups_across_processes"):
            if getattr(args, flag) is not None:
                overrides[flag] = getattr(args, flag) == "true"
        if args.fit and args.grid:
            parser.error("--fit and --grid are two reports; pass one of them.")
        if not 0 < args.mfu <= 1:
            parser.error(f"--mfu {args.mfu} must be in (0, 1], e.g. 0.35.")
        try:
            config = load_yaml(args.config) if args.config else {}
            for key in ("height", "width", "num_frames", "num_frames_per_chunk"):
                if getattr(args, key) is not None:
                    config[key] = getattr(args, key)
            if args.fit:
                fits = {gpu: fit(config, args.preset, gpu=gpu, mfu=args.mfu, num_processes=args.num_processes,
                                 headroom=args.headroom, **overrides) for gpu in args.gpu}  # fmt: skip
            variants = [{}]
            if args.grid:
                optim = overrides.get("optim") or config.get("optim") or "adamw_torch"
                optims = [optim] + [o for o in (OPTIMIZERS_8BIT[0],) if o != optim]
                variants = [{"gradient_checkpointing": c, "optim": o} for c in (False, True) for o in optims]
            plans = [
                plan_config(config, args.preset, gpu=gpu, mfu=args.mfu, num_processes=args.num_processes,
                            **{**overrides, **variant})
                for gpu in args.gpu
                for variant in variants
            ]  # fmt: skip
        except (ValueError, TypeError, FileNotFoundError) as error:
            parser.error(str(error))
        if args.fit:
            sys.stdout.write("\n".join(fit_report(best, tried, args.headroom) for best, tried in fits.values()))
            plans = [best for best, _ in fits.values() if best is not None]
        elif args.grid:
            sys.stdout.write(plans[0].summary(per_run=False) + "\n" + grid_table(plans))
            for gpu in dict.fromkeys(p.gpu.name for p in plans):
                over = [p for p in plans if p.gpu.name == gpu and not p.fits]
                if over:  # the warning of the row that comes closest says what still does not fit
                    count = sum(p.gpu.name == gpu for p in plans)
                    closest = min(over, key=lambda p: p.peak_memory_bytes)
                    sys.stdout.write(f"> WARNING: {len(over)} of {count} rows do not fit; {closest.warnings[0]}\n")
        else:
            sys.stdout.write("\n".join(p.to_markdown() for p in plans))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([p.to_dict() for p in plans], f, indent=1)

    parser.set_defaults(run=run)


SUBCOMMANDS = [_add_reward_server, _add_plan]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point `trl-arcopo` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="trl-arcopo", description="trl_arcopo commands.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
