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

- `trl-arcopo reward-server MODULE:CALLABLE [--host H] [--port N] [--kwargs JSON] [--max-concurrency N]`: serve a
  reward function over HTTP ([`~trl_arcopo.rewards.server.serve`]).

A subcommand is a function `_add_<name>(subparsers)` that adds its parser and sets `run=<function of the parsed
arguments>`; `main` lists them in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
from collections.abc import Callable


def load_callable(spec: str, kwargs: dict | None = None) -> Callable:
    """
    The object `MODULE:CALLABLE` names (`CALLABLE` may be dotted: `module:Class.attribute`). A class is instantiated
    with `kwargs`; with `kwargs`, a function is called with them to build the reward (a factory, e.g.
    `trl_arcopo.rewards.base:load_reward_func` with `{"name": "sharpness"}`); without, a function is the reward itself.
    A malformed `spec` or a missing module or attribute raises a `ValueError`, an object that cannot be built or is not
    callable a `TypeError`, each naming `spec`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"{spec!r} is not of the form MODULE:CALLABLE (e.g. 'trl_arcopo.rewards.base:redness' or "
            "'my_rewards:MyReward')."
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"Cannot import the module {module_name!r} of {spec!r} (MODULE:CALLABLE): {error}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec!r}: {module_name!r} has no attribute {attr!r}; give MODULE:CALLABLE.")
        obj = getattr(obj, part)
    if inspect.isclass(obj) or kwargs:
        try:
            obj = obj(**(kwargs or {}))
        except TypeError as error:
            raise TypeError(f"{spec!r} cannot be built with the keyword arguments {kwargs or {}}: {error}.") from None
    if not callable(obj):
        raise TypeError(f"{spec!r} is a {type(obj).__name__}, not a reward function: give MODULE:CALLABLE.")
    return obj


# ---------------------------------------------------------------------------------------------------- reward-server
def _add_reward_server(subparsers) -> None:
    parser = subparsers.add_parser(
        "reward-server",
        help="Serve a reward function over HTTP (POST /score, GET /health).",
        description="Serve a reward function over HTTP, for `trl_arcopo.rewards.RewardServerClient`.",
    )
    parser.add_argument(
        "reward", metavar="MODULE:CALLABLE", help="e.g. trl_arcopo.rewards.base:redness; a class is instantiated."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one).")
    parser.add_argument("--kwargs", default=None, help="JSON object of keyword arguments, e.g. '{\"scale\": 10}'.")
    parser.add_argument(
        "--max-concurrency", type=int, default=1, help="reward calls at a time (default 1; others wait)."
    )

    def run(args: argparse.Namespace) -> None:
        from .rewards.server import serve

        example = "'{\"scale\": 10}'"
        try:
            kwargs = json.loads(args.kwargs) if args.kwargs is not None else None
        except json.JSONDecodeError as error:
            parser.error(f"--kwargs {args.kwargs!r} is not JSON ({error}): give an object, e.g. {example}.")
        if kwargs is not None and not isinstance(kwargs, dict):
            parser.error(f"--kwargs {args.kwargs!r} is not a JSON object: give an object, e.g. {example}.")
        try:
            reward = load_callable(args.reward, kwargs)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
        serve(reward, host=args.host, port=args.port, max_concurrency=args.max_concurrency)

    parser.set_defaults(run=run)


SUBCOMMANDS = [_add_reward_server]


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
