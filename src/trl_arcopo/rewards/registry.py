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
Rewards by name: the one resolver behind `examples/train_arcopo.py --reward_funcs`, a YAML `reward_funcs:` list,
`trl-arcopo reward-server` and Python ([`load_reward_func`]).

A reward is written as a string or a mapping (see docs/rewards.md, "Rewards by name"):

    NAME[:ARGUMENT][?KEY=VALUE[&KEY=VALUE...]]      e.g. videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA
    {name: NAME, <argument>: ARGUMENT, KEY: VALUE}   e.g. {name: videoalign, path: checkpoints/VideoReward}

`NAME` is a reward family (`videoalign`, `pickscore`, `judge`, ...), a toy, a metric or a registered reward; any
other `MODULE:CALLABLE` or `package.module.function` is imported. The argument runs from the first `:` to the first
`?`, so it may hold `:` (URLs, Windows drives); options follow the first `?`, separated by `&`, each value
percent-decoded (`%26` is `&`, `%3F` is `?`) and typed as JSON when the option is not a string (`8`, `0.5`, `true`,
`null`, `[1, 10]`). An argument that holds `?` is given as an option instead (`judge:?base_url=...%3F...`).

Nothing heavy is imported to resolve a name: a family's modules (transformers' Qwen2-VL or CLIP, `openai`) are
imported when a reward of that family is built.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .options import (
    Converter,
    _boolean,
    _calibration,
    _choice,
    _device,
    _dimensions,
    _dtype,
    _http_url,
    _http_urls,
    _integer,
    _local_path,
    _mapping,
    _model_source,
    _number,
    _numbers,
    _scalar,
    _score_range,
    _string,
)


#: Where the syntax and every name are described.
DOCS = "docs/rewards.md, 'Rewards by name'"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
#: PickScore's tokenizer (its processor's): the PickScore repository holds no tokenizer.
PICKSCORE_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
#: The CLIP the LAION aesthetic head was trained on.
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


# -------------------------------------------------------------------------------------------------------- builders
def _default_device() -> str:
    """The current GPU if there is one (each process's own under `accelerate launch`), else the CPU."""
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _build_videoalign(path, dtype=None, device=None, **kwargs):
    import torch

    from .videoalign import VideoAlignReward

    return VideoAlignReward.from_pretrained(
        path, torch_dtype=dtype or torch.bfloat16, device=device or _default_device(), **kwargs
    )


def _build_hpsv3(path, dtype=None, device=None, **kwargs):
    import torch

    from .hpsv3 import HPSv3Reward

    return HPSv3Reward.from_pretrained(
        path, torch_dtype=dtype or torch.bfloat16, device=device or _default_device(), **kwargs
    )


def _from_hub_or_folder(load: Callable[[str], Any], source: str, what: str):
    """`load(source)`, an `OSError` naming `source` when it fails (a Hub id that is not cached, offline, gated)."""
    try:
        return load(source)
    except OSError as error:
        where = "the folder" if os.path.isdir(source) else "the Hub id (not a local folder)"
        raise OSError(f"cannot load the {what} from {where} {source!r}: {error}") from error


def _load_clip(source: str, dtype, device):
    import torch
    from transformers import AutoModel

    model = _from_hub_or_folder(lambda s: AutoModel.from_pretrained(s, dtype=dtype or torch.float32), source, "model")
    return model.to(device or _default_device()).eval()


def _load_tokenizer(source: str, tokenizer: str | None, fallback: str | None):
    """`tokenizer`; else the model's own when it is a folder with tokenizer files; else `fallback` (PickScore's
    repository has no tokenizer); else the model's source (a Hub id)."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        own = os.path.isdir(source) and any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES)
        tokenizer = source if own or fallback is None else fallback
    return _from_hub_or_folder(AutoTokenizer.from_pretrained, tokenizer, "tokenizer")


def _build_clip_score(path, tokenizer=None, dtype=None, device=None, **kwargs):
    from .clip import CLIPScoreReward

    model = _load_clip(path, dtype, device)
    return CLIPScoreReward(model, _load_tokenizer(path, tokenizer, None), **kwargs)


def _build_pickscore(path=PICKSCORE_MODEL, tokenizer=None, dtype=None, device=None, **kwargs):
    from .clip import CLIPScoreReward

    model = _load_clip(path, dtype, device)
    return CLIPScoreReward(
        model, _load_tokenizer(path, tokenizer, PICKSCORE_TOKENIZER), use_logit_scale=True, **kwargs
    )


def _build_aesthetic(path, clip=AESTHETIC_CLIP, dtype=None, device=None, **kwargs):
    from .clip import AestheticReward, load_aesthetic_head

    if os.path.isdir(path):
        candidates = [os.path.join(path, AESTHETIC_HEAD)]
        if not os.path.exists(candidates[0]):
            candidates = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".pth", ".pt")))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{path!r} holds {len(candidates)} head files (*.pth): give the head file itself ({AESTHETIC_HEAD})."
            )
        path = candidates[0]
    model = _load_clip(clip, dtype, device)
    head = load_aesthetic_head(path).to(model.device)
    embedding_dim = model.config.projection_dim
    if head.layers[0].in_features != embedding_dim:
        raise ValueError(
            f"the head {path!r} reads {head.layers[0].in_features}-dim embeddings but the CLIP {clip!r} gives "
            f"{embedding_dim}: use the CLIP the head was trained on ({AESTHETIC_CLIP} for the LAION head)."
        )
    return AestheticReward(model, head, **kwargs)


def _build_judge(base_url, **kwargs):
    from .judge import VLMJudgeReward

    return VLMJudgeReward(base_url, **kwargs)


def _build_server(url, **kwargs):
    from .server_client import RewardServerClient

    return RewardServerClient(list(url), **kwargs)


def _build_metric(class_name: str) -> Callable[..., Any]:
    def build(**kwargs):
        from . import video_metrics

        return getattr(video_metrics, class_name)(**kwargs)

    return build


def _toy(attr: str) -> Callable[..., Any]:
    def build():
        from . import base

        return getattr(base, attr)

    return build


# -------------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class RewardFamily:
    """
    A name [`load_reward_func`] knows: what it builds (`build(**options)`), the option its `NAME:ARGUMENT` fills
    (`argument`, e.g. `"path"`, or `None`), every option it takes with its converter, and the options it needs.
    """

    name: str
    summary: str
    build: Callable[..., Any]
    argument: str | None = None
    options: Mapping[str, Converter] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    #: what the argument is, for the error of a missing one
    argument_help: str = ""
    #: the pip extra a missing `requires` module is installed with
    requires: tuple[str, str] | None = None


_FRAMES = {"frames": _choice("first", "uniform", "fps"), "num_frames": _integer(1),
           "fps": _number(positive=True, nullable=True), "video_fps": _number(positive=True)}  # fmt: skip
_LOADING = {"dtype": _dtype, "device": _device}
_QWEN_LOADING = {**_LOADING, "load_in_8bit": _boolean, "base_model": _model_source("a Qwen2-VL folder or Hub id"),
                 "attn_implementation": _string(), "reference_exact": _boolean}  # fmt: skip
_CLIP_PREPROCESSING = {"image_size": _integer(1, nullable=True), "mean": _numbers(3), "std": _numbers(3)}
_REMOTE = {"timeout": _number(positive=True), "max_retries": _integer(0), "backoff": _number(),
           "on_failure": _choice("none", "raise")}  # fmt: skip
_VIDEOALIGN_HELP = (
    "the folder of the VideoReward release (hf download KlingTeam/VideoReward --local-dir checkpoints/VideoReward)"
)
_HPSV3_HELP = (
    "HPSv3.safetensors or its folder (hf download MizzenAI/HPSv3 HPSv3.safetensors --local-dir checkpoints/HPSv3)"
)

REWARD_FAMILIES: dict[str, RewardFamily] = {
    family.name: family
    for family in (
        RewardFamily(
            "videoalign", "VideoAlign (VideoReward): the sum of the standardised VQ, MQ and TA", _build_videoalign,
            "path", {"path": _local_path(_VIDEOALIGN_HELP), "dimensions": _dimensions, "fps": _number(positive=True),
                     "video_fps": _number(positive=True), "max_pixels": _integer(1), "min_pixels": _integer(1),
                     "normalize": _boolean, "calibration": _calibration, "batch_size": _integer(1), **_QWEN_LOADING},
            ("path",), _VIDEOALIGN_HELP,
        ),
        RewardFamily(
            "hpsv3", "HPSv3 on the frames, averaged", _build_hpsv3, "path",
            {"path": _local_path(_HPSV3_HELP), **_FRAMES, "min_pixels": _integer(1), "max_pixels": _integer(1),
             "batch_size": _integer(1), **_QWEN_LOADING},
            ("path",), _HPSV3_HELP,
        ),
        RewardFamily(
            "pickscore", "PickScore on the frames (CLIPScoreReward with the model's logit scale)", _build_pickscore,
            "path", {"path": _model_source(f"a PickScore folder or Hub id (default {PICKSCORE_MODEL})"),
                     "tokenizer": _model_source("a tokenizer folder or Hub id"), **_FRAMES, **_CLIP_PREPROCESSING,
                     "max_length": _integer(1, nullable=True), **_LOADING},
        ),
        RewardFamily(
            "clip_score", "CLIP score: text-frame cosine, averaged over the frames", _build_clip_score, "path",
            {"path": _model_source("a CLIPModel folder or Hub id, e.g. openai/clip-vit-base-patch32"),
             "tokenizer": _model_source("a tokenizer folder or Hub id"), **_FRAMES, **_CLIP_PREPROCESSING,
             "scale": _number(), "use_logit_scale": _boolean, "max_length": _integer(1, nullable=True), **_LOADING},
            ("path",), "a CLIPModel folder or Hub id, e.g. openai/clip-vit-base-patch32",
        ),
        RewardFamily(
            "aesthetic", "the LAION aesthetic predictor on CLIP frame embeddings", _build_aesthetic, "path",
            {"path": _local_path(f"the head file ({AESTHETIC_HEAD}) or its folder"),
             "clip": _model_source(f"a CLIPModel folder or Hub id (default {AESTHETIC_CLIP})"), **_FRAMES,
             **_CLIP_PREPROCESSING, "scale": _number(), **_LOADING},
            ("path",), f"the head file ({AESTHETIC_HEAD}) or its folder",
        ),
        RewardFamily(
            "judge", "a VLM behind an OpenAI-compatible server (VLMJudgeReward)", _build_judge, "base_url",
            {"base_url": _http_url, "model": _string(), "prompt_template": _string(), "score_parser": _string(True),
             "score_range": _score_range, **_FRAMES, "system_prompt": _string(True),
             "max_tokens": _integer(1, nullable=True), "temperature": _number(), "extra_body": _mapping,
             "api_key_env": _string(True), "max_concurrency": _integer(1), **_REMOTE, "name": _string()},
            ("base_url", "model"), "the server's OpenAI base URL, e.g. http://localhost:8000/v1",
            ("openai", "judge"),
        ),
        RewardFamily(
            "server", "a reward served by trl-arcopo reward-server (RewardServerClient)", _build_server, "url",
            {"url": _http_urls, "name": _string(True), "batch_size": _integer(1, nullable=True), **_REMOTE},
            ("url",), "the server's URL, or its replicas' comma-separated, e.g. http://127.0.0.1:8000",
        ),
        RewardFamily("motion_magnitude", "mean absolute frame difference, x scale, clipped to 1",
                     _build_metric("MotionMagnitudeReward"), options={"scale": _number(positive=True)}),
        RewardFamily("flicker", "1 - mean |change of mean luma| between frames", _build_metric("FlickerReward")),
        RewardFamily("sharpness", "variance of the Laplacian of the luma, x scale, clipped to 1",
                     _build_metric("SharpnessReward"), options={"scale": _number(positive=True)}),
        RewardFamily("redness", "toy: how much red dominates", _toy("redness")),
        RewardFamily("random", "control: uniform noise, no signal", _toy("random_reward")),
    )
}  # fmt: skip


#: The entry-point group in which an installed package registers reward functions by name: each entry point names a
#: mapping `name -> reward function` (the Moving Shapes world registers its rewards so, in `pyproject.toml`).
REWARD_ENTRY_POINTS = "trl_arcopo.rewards"


@functools.cache
def registered_rewards() -> dict[str, Callable]:
    """The reward functions installed packages register by name ([`REWARD_ENTRY_POINTS`]), loaded on first use."""
    rewards = {}
    for entry_point in importlib.metadata.entry_points(group=REWARD_ENTRY_POINTS):
        rewards.update(entry_point.load())
    return rewards


def _registered(name: str) -> Callable | None:
    return registered_rewards().get(name)


def reward_names() -> list[str]:
    """Every name [`load_reward_func`] resolves without an import path."""
    return sorted(REWARD_FAMILIES) + sorted(registered_rewards())


def _unknown(name: str) -> ValueError:
    registered = sorted(registered_rewards())
    close = difflib.get_close_matches(name, [*REWARD_FAMILIES, *registered], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"Unknown reward {name!r}.{hint} Known names: {', '.join(repr(n) for n in sorted(REWARD_FAMILIES))}; the "
        f"registered rewards {', '.join(repr(n) for n in registered)}; or an import path 'package.module.function' or "
        f"'MODULE:CALLABLE' (see {DOCS})."
    )


# ----------------------------------------------------------------------------------------------------- the resolver
@dataclass(frozen=True)
class RewardSpec:
    """
    A resolved reward name: `name` (a family of `REWARD_FAMILIES`, a registered reward, or an import path
    `MODULE:CALLABLE` / `package.module.function`) and its options, converted and checked. `build()` makes the reward
    function. Two specs that denote the same reward compare equal, whichever form (string or mapping) they came from.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> RewardFamily | None:
        return REWARD_FAMILIES.get(self.name)

    def build(self):
        """The reward function (a family's model is loaded now)."""
        family = self.family
        if family is None:
            registered = _registered(self.name)
            return registered if registered is not None else _import_callable(self.name, self.options)
        if family.requires is not None and importlib.util.find_spec(family.requires[0]) is None:
            raise ImportError(
                f"Reward {self.name!r} needs the `{family.requires[0]}` package: "
                f'pip install "trl_arcopo[{family.requires[1]}]".'
            )
        try:
            return family.build(**self.options)
        except (ValueError, OSError) as error:  # OSError: also a Hub id that cannot be loaded (offline, not found)
            raise _prefixed(error, f"Reward {self.name!r}: ") from error


def _prefixed(error: Exception, prefix: str) -> Exception:
    """`error` again, its message after `prefix` (a `ValueError` or `OSError` of the same type where possible)."""
    try:
        return type(error)(prefix + str(error))
    except Exception:  # noqa: BLE001 - a subclass with another constructor
        return (OSError if isinstance(error, OSError) else ValueError)(prefix + str(error))


def _split(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """`NAME[:ARGUMENT][?KEY=VALUE&...]` -> the head before `?`, and the options' `(key, raw value)` in order."""
    head, sep, query = spec.partition("?")
    options = []
    if sep:
        for piece in query.split("&"):
            if not piece:
                continue
            key, eq, value = piece.partition("=")
            if not eq or not _IDENTIFIER.match(key):
                raise ValueError(
                    f"{spec!r}: the option {piece!r} is not KEY=VALUE (options follow the first '?', separated by '&'; "
                    f"write '&' in a value as %26; see {DOCS})."
                )
            options.append((key, urllib.parse.unquote(value)))
    return head.strip(), options


def _from_string(spec: str) -> tuple[str, dict[str, Any]]:
    """The name and the raw options of a string spec (a JSON object is the mapping form)."""
    if spec.lstrip().startswith("{"):
        try:
            mapping = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ValueError(f"{spec!r} is not a JSON object ({error}); see {DOCS}.") from None
        return _from_mapping(mapping)
    head, pairs = _split(spec)
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise ValueError(f"{spec!r} gives the option {key!r} twice.")
        options[key] = value
    prefix, colon, argument = head.partition(":")
    if prefix in REWARD_FAMILIES:
        family = REWARD_FAMILIES[prefix]
        if colon and argument:
            if family.argument is None:
                raise ValueError(f"Reward {prefix!r} takes no argument after ':' (got {argument!r}).")
            if family.argument in options:
                raise ValueError(f"{spec!r} gives {family.argument!r} twice: after ':' and as an option.")
            options = {family.argument: argument, **options}
        return prefix, options
    if not head:
        raise ValueError(f"{spec!r} names no reward; see {DOCS}.")
    if colon or "." in head or _registered(head) is not None:  # an import path, or a registered reward
        typed = options if _registered(head) is not None else {k: _scalar(v) for k, v in options.items()}
        return head, typed
    raise _unknown(head)


def _from_mapping(mapping: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if not isinstance(mapping.get("name"), str):
        raise ValueError(  # noqa: TRY004 (a config error, as every other one)
            f"The reward {dict(mapping)!r} has no string `name`: write e.g. {{name: videoalign, path: "
            f"checkpoints/VideoReward}} (see {DOCS})."
        )
    name, options = _from_string(mapping["name"])
    for key, value in mapping.items():
        if key == "name":
            continue
        if key in options:
            raise ValueError(f"The reward {dict(mapping)!r} gives {key!r} twice (in `name` and as a key).")
        options[key] = value
    return name, options


def parse_reward_spec(spec: str | Mapping[str, Any] | RewardSpec | None = None, /, **options) -> RewardSpec:
    """
    Resolve a reward's name and check its options, without building it (nothing is loaded, but a missing local path
    is refused now). `spec` is `NAME[:ARGUMENT][?KEY=VALUE&...]`, a mapping `{"name": NAME, KEY: VALUE, ...}` (or
    that mapping as a JSON string), or a [`RewardSpec`]; keyword `options` add to it and override it. Without `spec`,
    the keywords are the mapping (`parse_reward_spec(name="flicker")`).

    Raises a `ValueError` for an unknown name (listing the known ones), an unknown option (listing the accepted
    ones) or a bad value; a `FileNotFoundError` naming a missing path and the reward that needs it.
    """
    if spec is None:
        if "name" not in options:
            raise ValueError(
                f"Give a reward name, e.g. load_reward_func('videoalign:checkpoints/VideoReward') ({DOCS})."
            )
        spec, options = options, {}
    if isinstance(spec, RewardSpec):
        name, raw = spec.name, dict(spec.options)
    elif isinstance(spec, Mapping):
        name, raw = _from_mapping(spec)
    elif isinstance(spec, str):
        name, raw = _from_string(spec)
    else:
        raise TypeError(f"A reward is a name (str) or a mapping with a `name`, not a {type(spec).__name__}: {spec!r}.")
    raw.update(options)
    family = REWARD_FAMILIES.get(name)
    if family is None:
        if _registered(name) is None:
            _import_target(name)  # a missing module is named now, before anything loads
        elif raw:
            raise ValueError(
                f"Reward {name!r} has no option {next(iter(raw))!r}: a registered reward takes no options."
            )
        return RewardSpec(name, raw)
    converted = {}
    for key, value in raw.items():
        if key not in family.options:
            accepted = ", ".join(family.options) or "none"
            raise ValueError(f"Reward {name!r} has no option {key!r}; its options are: {accepted}.")
        try:
            converted[key] = family.options[key](value)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"Reward {name!r} ({key}): {error}.") from None
        except ValueError as error:
            raise ValueError(f"Reward {name!r}: option {key}={value!r} is not valid: expected {error}.") from None
    for key in family.required:
        if key not in converted:
            if key == family.argument:
                what = f", {family.argument_help}" if family.argument_help else ""
                raise ValueError(
                    f"Reward {name!r} needs a {key}{what}: write {name}:<{key}> on the command line or "
                    f"{{name: {name}, {key}: <{key}>}} in YAML."
                )
            raise ValueError(
                f"Reward {name!r} needs the option {key!r}: write {name}:...?{key}=<{key}> on the command line or "
                f"{{name: {name}, {key}: <{key}>}} in YAML."
            )
    return RewardSpec(name, converted)


def load_reward_func(spec: str | Mapping[str, Any] | RewardSpec | None = None, /, **options):
    """
    The reward function a name denotes, the one place names resolve (see docs/rewards.md, "Rewards by name"):

    - a reward model or client with its argument and options: `"videoalign:PATH"`, `"hpsv3:PATH"`,
      `"pickscore[:PATH_OR_HUB_ID]"`, `"clip_score:PATH_OR_HUB_ID"`, `"aesthetic:HEAD_PATH"`, `"judge:BASE_URL"`,
      `"server:URL[,URL...]"`, e.g. `"videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA&dtype=bfloat16"`;
    - the weight-free metrics `"motion_magnitude"`, `"flicker"`, `"sharpness"` (`"motion_magnitude?scale=20"`);
    - the toys `"redness"` and `"random"`, and the rewards installed packages register ([`registered_rewards`]), such
      as the Moving Shapes world's (`"prominence_reward"`, ...);
    - an import path `"package.module.function"` or `"MODULE:CALLABLE"`: a class is instantiated with the options;
      a function given options is called with them to build the reward (a factory); without, it is the reward.

    `spec` may also be a mapping (`{"name": "videoalign", "path": ..., "dimensions": ["VQ", "MQ"]}`, the YAML
    form) or a [`RewardSpec`]; keyword `options` add to it and override it, and without `spec` they are the mapping
    (`load_reward_func(name="sharpness")`). Errors: see [`parse_reward_spec`]; a family whose package is missing
    raises an `ImportError` naming the pip extra.
    """
    return parse_reward_spec(spec, **options).build()


def _import_target(target: str) -> tuple[str, str, str]:
    """The module and attribute of `MODULE:CALLABLE` or `package.module.function`, and which form it is; a malformed
    target or a module that cannot be found raises a `ValueError` naming it (and a reward name it resembles)."""
    module_name, colon, attr = target.partition(":")
    if not colon:
        module_name, _, attr = target.rpartition(".")
    form = "MODULE:CALLABLE" if colon else "a dotted path 'package.module.function'"
    if not module_name or not attr:
        raise ValueError(
            f"{target!r} is not of the form MODULE:CALLABLE (e.g. 'trl_arcopo.rewards.base:redness' or "
            f"'my_rewards:MyReward') nor a reward name; see {DOCS}."
        )
    top = module_name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        raise _cannot_import(target, module_name, form, f"No module named {top!r}")
    return module_name, attr, form


def _cannot_import(target: str, module_name: str, form: str, error: object) -> ValueError:
    close = difflib.get_close_matches(target.partition(":")[0], list(REWARD_FAMILIES), n=1)
    hint = f" Did you mean the reward {close[0]!r}?" if close else ""
    return ValueError(
        f"Cannot import the module {module_name!r} of {target!r} ({form}): {error}.{hint} Reward names: "
        f"{', '.join(repr(n) for n in sorted(REWARD_FAMILIES))} (see {DOCS})."
    )


def _import_callable(target: str, kwargs: Mapping[str, Any]):
    """
    The object `MODULE:CALLABLE` (`CALLABLE` may be dotted: `module:Class.attribute`) or `package.module.function`
    names; a class is instantiated with `kwargs`, a function given `kwargs` is called with them. A missing module or
    attribute raises a `ValueError`, an object that cannot be built or is not callable a `TypeError`, each naming
    `target`.
    """
    module_name, attr, form = _import_target(target)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise _cannot_import(target, module_name, form, error) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{target!r}: {module_name!r} has no attribute {attr!r}; give MODULE:CALLABLE.")
        obj = getattr(obj, part)
    if inspect.isclass(obj) or kwargs:
        try:
            obj = obj(**kwargs)
        except TypeError as error:
            raise TypeError(
                f"{target!r} cannot be built with the keyword arguments {dict(kwargs)}: {error}."
            ) from None
    if not callable(obj):
        raise TypeError(f"{target!r} is a {type(obj).__name__}, not a reward function: give MODULE:CALLABLE.")
    return obj
