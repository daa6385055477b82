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
"""Documenting and sharing adapters trained with AR-CoPO: the model card, uploads to the Hub, and the trainer's save and push hooks."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import os
import re
import shutil
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers.utils.hub import PushInProgress

from .completions import encode_gif
from .io_utils import atomic_path
from .lora_files import LORA_WEIGHT_NAME, save_lora_adapter
from .nonfinite import check_finite_parameters


__all__ = [
    "ARCOPO_BIBTEX",
    "LORA_WEIGHT_NAME",
    "MODEL_CARD_TEMPLATE",
    "REQUIRED_TAGS",
    "TRL_BIBTEX",
    "create_model_card",
    "push_adapter_to_hub",
]

#: The method's paper, as TRL's trainers declare theirs (`_paper`): what the model card links and cites.
ARCOPO_PAPER = {
    "title": "AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy Optimization",
    "id": "2603.17461",
}
REQUIRED_TAGS = ["trl", "arcopo", "diffusers", "lora", "text-to-video"]
#: What a push uploads from a training folder: the diffusers-format adapter and its model card, nothing else (not the
#: checkpoints, the replay buffer, completions, logs or `training_args.bin`).
PUSH_ALLOW_PATTERNS = [LORA_WEIGHT_NAME, "README.md"]
#: The sample videos `log_completions` writes, uploaded when asked (`push_to_hub(sample_videos=True)`).
SAMPLE_VIDEO_PATTERN = "completions/*.gif"

#: The training arguments a model card lists.
CARD_FIELDS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "num_generations",
    "num_anchors",
    "fork_noise_scale",
    "pivot_chunk",
    "loss_type",
    "num_iterations",
    "epsilon",
    "temperature",
    "distance_reduction",
    "scale_rewards",
    "quasi_norm_p",
    "beta",
    "train_denoising_steps",
    "reward_weights",
    "height",
    "width",
    "num_frames",
    "num_frames_per_chunk",
    "denoising_sigmas",
    "sampler",
)


def card_training_config(args: Any) -> dict[str, Any]:
    """The `CARD_FIELDS` of a training config (the card keeps what YAML can show: `_plain_config`)."""
    return {k: v for k, v in args.to_dict().items() if k in CARD_FIELDS}


def args_without_token(args: Any) -> Any:
    """A copy of the training `args` with `hub_token` cleared: what `training_args.bin` holds."""
    safe = copy.copy(args)
    safe.hub_token = None
    return safe


# Training-config keys that may hold credentials: never written into a (possibly public) model card.
_SECRET_KEY = re.compile(r"token|secret|password|api_?key|credential", re.IGNORECASE)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

ARCOPO_BIBTEX = """@article{he2026arcopo,
    title   = {{AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy Optimization}},
    author  = {He and Feng and Ge and Zhang and Ma and Song and Liu and Li},
    journal = {arXiv preprint arXiv:2603.17461},
    year    = {2026}
}"""

TRL_BIBTEX = """@software{vonwerra2020trl,
    title        = {{TRL: Transformer Reinforcement Learning}},
    author       = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
    year         = {2020},
    publisher    = {GitHub},
    howpublished = {\\url{https://github.com/huggingface/trl}}
}"""

#: The model card template (Jinja, rendered by `huggingface_hub.ModelCard.from_template`).
MODEL_CARD_TEMPLATE = (Path(__file__).parent / "templates" / "model_card.md").read_text()


def _plain_config(config: Mapping) -> dict[str, Any]:
    """
    What of a training config a card may show: string keys that do not name a secret, with numbers, booleans,
    strings, paths, `None`, lists of those and nested mappings; anything else (a function, a module) is left out.
    """
    plain = {}
    for key, value in config.items():
        if not isinstance(key, str) or _SECRET_KEY.search(key):
            continue
        if isinstance(value, Mapping):
            plain[key] = _plain_config(value)
        elif isinstance(value, list | tuple):
            items = [_plain_scalar(v) for v in value]
            if all(item is not _LEFT_OUT for item in items):
                plain[key] = items
        elif (scalar := _plain_scalar(value)) is not _LEFT_OUT:
            plain[key] = scalar
    return plain


_LEFT_OUT = object()


def _plain_scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return _LEFT_OUT


class _CardDumper(yaml.SafeDumper):
    """Block mappings, inline lists: `sigmas: [1.0, 0.75, 0.5]`."""


_CardDumper.add_representer(
    list, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _config_yaml(config: Mapping) -> str:
    """The card's training configuration as YAML, secrets and unserialisable values left out."""
    text = yaml.dump(_plain_config(config), Dumper=_CardDumper, sort_keys=False, default_flow_style=False, width=1000)
    return text.rstrip("\n")


def _as_mapping(config: Any) -> Mapping | None:
    if config is None or isinstance(config, Mapping):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if callable(getattr(config, "to_dict", None)):
        return config.to_dict()
    raise TypeError(f"`training_config` must be a dict (or a dataclass), got {type(config).__name__}.")


def _framework_versions() -> list[tuple[str, str]]:
    versions = []
    for name in ("trl_arcopo", "trl", "diffusers", "peft", "transformers", "torch", "huggingface_hub"):
        try:
            versions.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def create_model_card(
    output_dir: str | os.PathLike,
    base_model: str | None,
    model_name: str,
    hub_model_id: str | None = None,
    trainer_name: str = "AR-CoPO",
    training_config: dict | None = None,
    tags: list[str] | None = None,
    dataset_name: str | None = None,
    adapter_names: list[str] | None = None,
    citation: str = ARCOPO_BIBTEX,
    paper_id: str = ARCOPO_PAPER["id"],
) -> ModelCard:
    r"""
    Write the model card (`README.md`) of a LoRA adapter trained with AR-CoPO, offline and atomically.

    The YAML header sets `library_name: diffusers`, `license: apache-2.0`, `pipeline_tag: text-to-video`, the
    `base_model` (only when it is a Hub repo id: a local path is shown in the text but not declared), the `datasets`
    and the tags `trl`, `arcopo`, `diffusers`, `lora`, `text-to-video` followed by `tags`. The body describes the
    adapter, gives a quick start with [`SelfForcingPipeline`] and `load_lora_weights`, lists the training
    configuration and framework versions, and the BibTeX citations of AR-CoPO and TRL.

    Args:
        output_dir (`str` or `os.PathLike`):
            The folder to write `README.md` into (created if needed); usually the one holding the adapter file.
        base_model (`str`, *optional*):
            The Hub repo id (or local path) of the base pipeline the adapter was trained from.
        model_name (`str`):
            The title of the card.
        hub_model_id (`str`, *optional*):
            The repo id the quick start loads the adapter from; defaults to the name of `output_dir`.
        trainer_name (`str`, defaults to `"AR-CoPO"`):
            The training method named in the card.
        training_config (`dict`, *optional*):
            Hyper-parameters to list. Only simple values are rendered (numbers, booleans, strings, paths, `None`,
            lists of those and nested dicts of those); others (tensors, objects, callables...) are skipped, and so
            are keys that look like credentials (`hub_token`, `api_key`...). A dataclass is accepted too.
        tags (`list[str]`, *optional*):
            Tags to add after the required ones; duplicates are dropped, order is kept.
        dataset_name (`str`, *optional*):
            The Hub id of the prompt dataset.
        adapter_names (`list[str]`, *optional*):
            The adapters trained in the run, listed in the card.
        citation (`str`, defaults to `ARCOPO_BIBTEX`):
            The BibTeX entry of the method; TRL's is always added.
        paper_id (`str`, defaults to AR-CoPO's):
            The arXiv id of the method's paper, linked as `https://huggingface.co/papers/<id>`.

    Returns:
        [`~huggingface_hub.ModelCard`]: the card, as written to `output_dir/README.md`.
    """
    output_dir = os.fspath(output_dir)
    repo_id = hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    all_tags = list(dict.fromkeys([*REQUIRED_TAGS, *(tags or [])]))
    declared_base = base_model if base_model and _is_hub_id(base_model) else None
    card_data = ModelCardData(
        base_model=declared_base,
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="text-to-video",
        tags=all_tags,
        datasets=[dataset_name] if dataset_name else None,
        model_name=model_name,
    )
    if declared_base:
        base_model_md = f"[{base_model}](https://huggingface.co/{base_model})"
    elif base_model:
        base_model_md = f"`{base_model}`"
    else:
        base_model_md = "a Self-Forcing model"
    training_config = _as_mapping(training_config)
    card = ModelCard.from_template(  # the template's variables
        card_data, template_str=MODEL_CARD_TEMPLATE, model_name=model_name, base_model=base_model,
        base_model_md=base_model_md, repo_id=repo_id, trainer_name=trainer_name,
        paper_url=f"https://huggingface.co/papers/{paper_id}",
        dataset_name=dataset_name, adapter_names=list(adapter_names or []), framework_versions=_framework_versions(),
        training_config_yaml=_config_yaml(training_config) if training_config else "", citation=citation.strip(),
        trl_citation=TRL_BIBTEX,
    )  # fmt: skip

    os.makedirs(output_dir, exist_ok=True)
    with atomic_path(os.path.join(output_dir, "README.md")) as tmp_path:
        card.save(tmp_path)
    return card


def push_adapter_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    commit_message: str = "Upload LoRA adapter trained with AR-CoPO",
    token: str | None = None,
) -> str:
    r"""
    Upload the adapter and the model card of a folder to a Hub model repo, creating the repo if needed.

    Only `PUSH_ALLOW_PATTERNS` are uploaded (`pytorch_lora_weights.safetensors` and `README.md`): checkpoints, the
    replay buffer, completions, logs and `training_args.bin` stay local.

    Args:
        folder (`str` or `os.PathLike`):
            The local folder, e.g. the `output_dir` of [`save_lora_adapter`] and [`create_model_card`].
        repo_id (`str`):
            The model repo, `"namespace/name"`.
        private (`bool`, *optional*):
            Visibility of a newly created repo (`None`: the namespace's default); an existing repo is unchanged.
        commit_message (`str`, *optional*):
            The commit message.
        token (`str`, *optional*):
            A Hub token; defaults to the locally saved one.

    Returns:
        `str`: the URL of the commit.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No folder to upload at {folder}.")
    HfApi(token=token).create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    commit = upload_training_folder(repo_id, folder, token, commit_message)
    return str(getattr(commit, "commit_url", None) or commit)


def upload_training_folder(
    repo_id: str,
    folder: str,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    blocking: bool = True,
    sample_videos: bool = False,
):
    """
    Upload what a training folder may publish: the adapter and its card (`PUSH_ALLOW_PATTERNS`), plus the sample
    videos (`completions/*.gif`) with `sample_videos`; never checkpoints, buffers, logs or `training_args.bin`.
    Returns the commit info, or a future when not `blocking`. Every upload of the library goes through here.
    """
    return HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message,
        token=token,
        run_as_future=not blocking,
        revision=revision,
        allow_patterns=PUSH_ALLOW_PATTERNS + ([SAMPLE_VIDEO_PATTERN] if sample_videos else []),
    )


def save_sample_gif(folder: str, name: str, prompt: str, videos: torch.Tensor, rewards: torch.Tensor) -> str:
    """
    Write a group's videos `[G, F, C, H, W]` in `[0, 1]` side by side as `folder/name.gif`, with the prompt and the
    rewards in `folder/name.txt`. Returns the GIF's path.
    """
    os.makedirs(folder, exist_ok=True)
    grid = torch.cat(list(videos.float().cpu()), dim=-1)  # [F, C, H, G * W]
    path = os.path.join(folder, f"{name}.gif")
    with open(path, "wb") as f:
        f.write(encode_gif(grid))
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write(f"{prompt}\nrewards: {[round(r, 4) for r in rewards.tolist()]}\n")
    return path


def push_checkpoint(checkpoint_folder: str, output_dir: str, repo_id: str, step: int, token: str | None = None,
                    revision: str | None = None):  # fmt: skip
    """
    A push during training: the checkpoint's adapter and card become `output_dir`'s, then those two files are uploaded
    in the background ([`upload_training_folder`]). Returns the upload's future.
    """
    for name in PUSH_ALLOW_PATTERNS:
        if os.path.isfile(os.path.join(checkpoint_folder, name)):
            shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
    message = f"Training in progress, step {step}"
    return upload_training_folder(repo_id, output_dir, token, message, revision, blocking=False)


class HubMixin:
    """
    [`~trl_arcopo.ARCoPOTrainer`]'s saving and sharing hooks on `transformers.Trainer`: the saved model is the adapter
    and its model card, and only those (plus sample videos on request) reach the Hub. Needs the trainer's
    `pipeline`, `adapter_name`, `adapter_state_dict()`, `ema_weights(folder)` (the context in which the adapter holds
    the weights to save into `folder`), and TRL's `_name`, `_tag_names` and `_paper` for the model card.
    """

    # `_save` and `_push_from_checkpoint` are private in `Trainer`: `save_model` and the checkpoint pushes call them,
    # and no public hook chooses what a save writes (here the adapter and its card, not the model's state dict) or
    # what a push of `hub_strategy` uploads.
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        with self.ema_weights(output_dir):
            check_finite_parameters(self.adapter_state_dict(), "when saving", self.state.global_step)
            save_lora_adapter(self.accelerator.unwrap_model(self.model), output_dir, adapter_name=self.adapter_name)
        torch.save(args_without_token(self.args), os.path.join(output_dir, "training_args.bin"))
        self.create_model_card(folder=output_dir)  # next to the weights, as diffusers' training scripts do

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, sample_videos: bool = False, **kwargs):  # fmt: skip
        """
        Save the adapter and its model card, then upload those two files to `args.hub_model_id` and nothing else of
        `output_dir` ([`~trl_arcopo.hub.upload_training_folder`]); `sample_videos=True` adds the sample videos of
        `log_completions`. `kwargs` go to [`~trl_arcopo.ARCoPOTrainer.create_model_card`] (e.g. `dataset_name`).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        default_name = (self.args.hub_model_id or self.args.output_dir.rstrip("/")).split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=kwargs.pop("model_name", None) or default_name, **kwargs)
        self._finish_current_push()
        revision = revision if revision is not None else self.args.hub_revision
        return upload_training_folder(
            self.hub_model_id, self.args.output_dir, token, commit_message, revision, blocking, sample_videos
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`hub_strategy` pushes during training upload the same two files as [`~trl_arcopo.ARCoPOTrainer.push_to_hub`]."""
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == "end":
            return
        if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        step, folder = self.state.global_step, checkpoint_folder
        job = push_checkpoint(folder, args.output_dir, self.hub_model_id, step, args.hub_token, args.hub_revision)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, folder: str | None = None, **kwargs) -> None:  # fmt: skip
        """Write the model card (`README.md`, into `output_dir` or `folder`): base model, tags, configuration, citations."""
        if not self.is_world_process_zero():
            return
        create_model_card(  # the trainer's TRL pieces: `_name`, `_tag_names` and `_paper`
            folder or self.args.output_dir,
            base_model=self.pipeline.name_or_path or None,
            model_name=model_name or os.path.basename(self.args.output_dir.rstrip("/")),
            hub_model_id=self.args.hub_model_id,
            trainer_name=self._name,
            training_config=card_training_config(self.args),
            tags=[*self._tag_names, *([tags] if isinstance(tags, str) else list(tags or []))],
            citation=self._paper["citation"],
            paper_id=self._paper["id"],
            dataset_name=dataset_name,
            adapter_names=[self.adapter_name],
        )
