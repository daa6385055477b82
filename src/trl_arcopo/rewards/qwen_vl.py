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
Reward models built on Qwen2-VL (VideoAlign, HPSv3), in plain torch on `[N, F, 3, H, W]` videos in `[0, 1]`.

- Its inputs come from [`~trl_arcopo.rewards.qwen_vl_inputs.prepare_inputs`] (in `qwen_vl_inputs`).
- [`QwenVLRewardModel`]: a Qwen2-VL backbone whose last hidden states at reward tokens go through a head.
- [`QwenVLReward`]: the micro-batched scoring and the checkpoint loading shared by the reward functions, and
  [`~trl_arcopo.rewards.qwen_vl_inputs.prompt_criteria`], the wording their prompts share.
- Loading released checkpoints: [`merge_lora`], [`remap_qwen2vl_keys`] (pre-transformers-5 key names) and
  [`load_reward_model`] (optionally in 8 bits).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io_utils import load_tensors_only
from ..quantization import require_bitsandbytes
from .qwen_vl_inputs import (
    IMAGE_FACTOR,
    prepare_inputs,
    smart_resize,
)


#: How the backbone positions the tokens: see [`QwenVLRewardModel`].
POSITION_MODES = ("sequential", "mrope")


# ---------------------------------------------------------------------------------------------------------- model
class QwenVLRewardModel(nn.Module):
    r"""
    A Qwen2-VL reward model: the backbone's last hidden states at the reward tokens, through a head.

    Args:
        backbone (`transformers.Qwen2VLForConditionalGeneration` or `transformers.Qwen2VLModel`): the vision-language
            model (its `lm_head`, if any, is not used). Put in `eval()`, gradients off.
        head (`nn.Module`): maps hidden states `[..., D]` to scores `[..., out_dim]`; kept and run in `head_dtype`.
        reward_token_ids (`Sequence[int]`): the tokens read, in the order they appear in the text; each must occur
            exactly once per text.
        positions (`str`, defaults to `"sequential"`): the rotary positions of the tokens. `"sequential"` numbers
            every token `0, 1, 2, ...` on all three M-RoPE axes, which is what the released VideoAlign and HPSv3
            checkpoints were trained with (their forward called the language model without Qwen2-VL's 3-D
            positions). `"mrope"` uses Qwen2-VL's own 3-D positions for the vision tokens (from
            `mm_token_type_ids` and the grids), for heads trained that way.
        head_dtype (`torch.dtype`, defaults to `torch.float32`): the dtype the head is kept and run in; the hidden
            states are cast to it (VideoAlign's reference runs its head in the checkpoint's bfloat16).

    `forward(**inputs)` takes [`prepare_inputs`]'s dict and returns the scores `[B, n_reward_tokens, out_dim]`,
    float32.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, reward_token_ids: Sequence[int],
                 positions: str = "sequential", head_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if positions not in POSITION_MODES:
            raise ValueError(f"`positions={positions!r}` must be one of {POSITION_MODES}.")
        if not reward_token_ids:
            raise ValueError("`reward_token_ids` is empty: give the ids of the tokens whose hidden states are scored.")
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head.to(head_dtype).eval().requires_grad_(False)
        self.head_dtype = head_dtype
        self.reward_token_ids = [int(i) for i in reward_token_ids]
        self.positions = positions

    @property
    def core(self) -> nn.Module:
        """The `Qwen2VLModel` (vision tower and language model) of the backbone."""
        return self.backbone.model if hasattr(self.backbone, "lm_head") else self.backbone

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def reward_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where each reward token sits in each row of `input_ids` `[B, L]`: `[B, n_reward_tokens]`."""
        positions = []
        for token_id in self.reward_token_ids:
            mask = input_ids == token_id  # [B, L]
            counts = mask.sum(dim=1)
            if not bool((counts == 1).all()):
                raise ValueError(
                    f"Each text must hold the reward token {token_id} exactly once, got counts {counts.tolist()}: "
                    "a prompt that itself contains the reward token (or a tokenizer without it) breaks scoring."
                )
            positions.append(mask.long().argmax(dim=1))
        return torch.stack(positions, dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor,
                **vision_inputs: torch.Tensor) -> torch.Tensor:  # fmt: skip
        b, length = input_ids.shape
        if self.positions == "sequential":
            position_ids = torch.arange(length, device=input_ids.device).expand(b, length)  # [B, L]
            kwargs = {"position_ids": position_ids}
        else:
            kwargs = {"mm_token_type_ids": mm_token_type_ids}
        output = self.core(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs,
                           **vision_inputs)  # fmt: skip
        hidden = output.last_hidden_state  # [B, L, D]
        index = self.reward_positions(input_ids)  # [B, n]
        picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, n, D]
        return self.head(picked.to(self.head_dtype)).float()  # [B, n, out_dim]


class QwenVLReward:
    """
    What the Qwen2-VL reward functions share: `pairs(prompts, videos)` (defined by each) turns the videos into `B`
    visuals `[B, T, 3, H, W]` and texts, which [`prepare_inputs`] and the model score by `batch_size`
    ([`raw_scores`] -> `[B, n_reward_tokens, out_dim]`); a visual's score does not depend on its batch mates.
    `from_pretrained` loads a released checkpoint that `read_checkpoint` (defined by each) reads.

    With `reference_exact=True` the frames are resized as the reference inference resizes them, 8-bit rounding
    included (`reference_resample`, see [`resize_normalize`]), and `from_pretrained` keeps the head in the dtype the
    reference runs it in (`reference_head_dtype`; `None` is the checkpoint's).
    """

    media = "video"
    #: The tokens the model reads, in order; the tokenizer must map them to the model's `reward_token_ids`.
    special_tokens: tuple[str, ...] = ()
    #: The reference's resize (a mode of [`resize_normalize`]) and head dtype (`None`: the checkpoint's).
    reference_resample = "float"
    reference_head_dtype: torch.dtype | None = torch.float32

    def __init__(self, model: QwenVLRewardModel, tokenizer, min_pixels: int, max_pixels: int, batch_size: int,
                 reference_exact: bool = False):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"`batch_size={batch_size}` must be at least 1.")
        smart_resize(IMAGE_FACTOR, IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)  # checks the bounds
        token_ids = tokenizer.convert_tokens_to_ids(list(self.special_tokens))
        if token_ids != model.reward_token_ids:
            raise ValueError(
                f"The tokenizer maps {self.special_tokens} to {token_ids} but the model reads tokens "
                f"{model.reward_token_ids}: use the tokenizer of the checkpoint (Qwen2-VL's with these tokens added)."
            )
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.min_pixels, self.max_pixels, self.batch_size = min_pixels, max_pixels, batch_size
        self.reference_exact = bool(reference_exact)
        self.resample = self.reference_resample if self.reference_exact else "float"

    @classmethod
    def read_checkpoint(
        cls, path: Path, base_model: str | os.PathLike | None
    ) -> tuple[dict, str | Path, object, dict]:
        """The state dict in transformers 5's layout, where the Qwen2-VL config is, the tokenizer, reward kwargs."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
        load_in_8bit: bool = False,
        base_model: str | os.PathLike | None = None,
        attn_implementation: str = "sdpa",
        **kwargs,
    ):
        r"""
        The reward on a released checkpoint, from local files (tensors only are read; see each reward for `path`).

        Args:
            path: the release (file or folder) as downloaded.
            torch_dtype, device: of the backbone (`bfloat16` as trained); the head runs in float32 on `device`
                (with `reference_exact=True`, in `reference_head_dtype`).
            load_in_8bit (`bool`): quantise the backbone's linear layers with bitsandbytes
                (`pip install "trl_arcopo[rewards]"`), about half the memory of bfloat16.
            base_model: the Qwen2-VL the checkpoint was fine-tuned from (hub id or folder), for what the release
                lacks (config, tokenizer, base weights); defaults to the release's own.
            attn_implementation (`str`, defaults to `"sdpa"`).
            kwargs: the reward's arguments; they override what the release sets. With `reference_exact=True` the
                head is also kept in the reference's dtype (`reference_head_dtype`), not float32.
        """
        from transformers import Qwen2VLConfig

        state, config_source, tokenizer, settings = cls.read_checkpoint(Path(path), base_model)
        token_ids = tokenizer.convert_tokens_to_ids(list(cls.special_tokens))
        config = Qwen2VLConfig.from_pretrained(config_source)
        head_dtype = cls.reference_head_dtype if kwargs.get("reference_exact") else torch.float32
        model = load_reward_model(state, config, token_ids, torch_dtype=torch_dtype, device=device,
                                  load_in_8bit=load_in_8bit, attn_implementation=attn_implementation,
                                  head_dtype=head_dtype)  # fmt: skip
        return cls(model, tokenizer, **{**settings, **kwargs})

    def pairs(self, prompts: Sequence[str], videos: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        raise NotImplementedError

    def _pairs(self, prompts: Sequence[str], videos: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"`videos` must be [N, F, 3, H, W] in [0, 1], got shape {tuple(videos.shape)}.")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"Got {len(prompts)} prompts for {videos.shape[0]} videos: give one prompt per video.")
        return self.pairs(prompts, videos)

    def model_inputs(self, prompts: Sequence[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """All the model inputs at once (for inspection; scoring goes by `batch_size`)."""
        visuals, texts = self._pairs(prompts, videos)
        return prepare_inputs(self.tokenizer, visuals, texts, self.media, self.min_pixels, self.max_pixels,
                              self.model.device, self.resample)  # fmt: skip

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        """The head's outputs `[B, n_reward_tokens, out_dim]` (float32, CPU) for the `B` pairs of `pairs`."""
        visuals, texts = self._pairs(prompts, videos)
        scores = []
        for start in range(0, len(texts), self.batch_size):
            stop = start + self.batch_size
            inputs = prepare_inputs(self.tokenizer, visuals[start:stop], texts[start:stop], self.media,
                                    self.min_pixels, self.max_pixels, self.model.device, self.resample)  # fmt: skip
            scores.append(self.model(**inputs).cpu())
        return torch.cat(scores)


# -------------------------------------------------------------------------------------------------------- loading
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def merge_lora(state_dict: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """
    Fold every LoRA pair into its base weight: `W + scale * B @ A` (`A` `[r, in]`, `B` `[out, r]`, computed in
    float32, cast back to `W`'s dtype). LoRA keys are PEFT's, `<module>.lora_A[.<adapter>].weight`; the base weight is
    `<module>.base_layer.weight` (a full PEFT state dict, whose other `base_layer` tensors are renamed too) or
    `<module>.weight`. Returns a new dict without LoRA tensors and `base_layer` names.
    """
    merged, pairs = {}, {}
    for key, value in state_dict.items():
        if match := _LORA.match(key):
            pair = pairs.setdefault(match["module"], {})
            if match["which"] in pair:
                raise ValueError(f"Two LoRA adapters on {match['module']}: merge one adapter at a time.")
            pair[match["which"]] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(
                f"{module} has lora_{''.join(pair)} but not its partner: the LoRA tensors are incomplete."
            )
        key = f"{module}.weight"
        if key not in merged:
            raise ValueError(f"LoRA tensors for {module} but no base weight ({key} or {module}.base_layer.weight).")
        weight = merged[key]
        merged[key] = (weight.float() + scale * (pair["B"].float() @ pair["A"].float())).to(weight.dtype)
    return merged


def remap_qwen2vl_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Rename a Qwen2-VL reward model's keys to transformers 5's: PEFT's `base_model.model.` prefix dropped,
    `visual.*` -> `model.visual.*`, `model.*` (the language model before transformers 4.52) ->
    `model.language_model.*`, `rm_head.*` -> `head.*`; `lm_head.*` and keys already in the new layout are kept.
    """
    remapped = {}
    for key, value in state_dict.items():
        new = key.removeprefix("base_model.model.")
        if new.startswith("visual."):
            new = "model." + new
        elif new.startswith("model.") and not new.startswith(("model.language_model.", "model.visual.")):
            new = "model.language_model." + new.removeprefix("model.")
        elif new.startswith("rm_head."):
            new = "head." + new.removeprefix("rm_head.")
        if new in remapped:
            raise ValueError(f"Two keys of the checkpoint map to {new!r} (one of them is {key!r}).")
        remapped[new] = value
    return remapped


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    A state dict from a `.safetensors` file or a torch file read with `weights_only=True` (tensors only: a crafted
    file cannot run code), memory-mapped.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = load_tensors_only(path, "a state dict of tensors", mmap=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return dict(state)


def build_head(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """
    The reward head whose tensors (keys without the `head.` prefix) are `state`: a linear layer (`weight`, optional
    `bias`; VideoAlign's) or HPSv3's MLP, `Linear -> ReLU -> Dropout -> Linear -> ReLU -> Linear` (`0.*`, `3.*`,
    `5.*`). Loaded, in `dtype` (`None`: the dtype of the checkpoint's tensors).
    """
    keys = set(state)
    if keys in ({"weight"}, {"weight", "bias"}):
        out_dim, in_dim = state["weight"].shape
        head = nn.Linear(in_dim, out_dim, bias="bias" in keys)
    elif keys == {f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}:
        (hidden, in_dim), (inner, _), (out_dim, _) = (state[f"{i}.weight"].shape for i in (0, 3, 5))
        head = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.05), nn.Linear(hidden, inner),
                             nn.ReLU(), nn.Linear(inner, out_dim))  # fmt: skip
    else:
        raise ValueError(
            f"Unknown reward head layout {sorted(keys)}: expected a linear layer (`rm_head.weight`) or HPSv3's MLP "
            "(`rm_head.{0,3,5}.weight/bias`)."
        )
    dtype = dtype or next(iter(state.values())).dtype
    head.load_state_dict({key: value.to(dtype) for key, value in state.items()})
    return head.to(dtype).eval()


def load_tokenizer(source: str | os.PathLike, special_tokens: Sequence[str]):
    """`AutoTokenizer.from_pretrained(source)`, with the reward's special tokens added (as in training) if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if missing := [token for token in special_tokens if token not in tokenizer.get_vocab()]:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def eight_bit_config():
    """transformers' `BitsAndBytesConfig(load_in_8bit=True)`, or an `ImportError` naming the install."""
    require_bitsandbytes("`load_in_8bit=True`", extra="rewards")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def load_reward_model(
    state_dict: Mapping[str, torch.Tensor],
    config,
    reward_token_ids: Sequence[int],
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_in_8bit: bool = False,
    attn_implementation: str = "sdpa",
    positions: str = "sequential",
    head_dtype: torch.dtype | None = torch.float32,
) -> QwenVLRewardModel:
    r"""
    A [`QwenVLRewardModel`] from a checkpoint in transformers 5's layout ([`remap_qwen2vl_keys`]).

    Args:
        state_dict: `model.visual.*`, `model.language_model.*` and `head.*` tensors (`lm_head.*` is dropped: the
            reward does not use it).
        config (`transformers.Qwen2VLConfig`): the architecture; its vocabulary size is set from the embedding.
        reward_token_ids, positions: as in [`QwenVLRewardModel`].
        torch_dtype, device: of the backbone (the head is on the same device).
        load_in_8bit (`bool`): quantise the backbone's linear layers with bitsandbytes, about half the memory
            of bfloat16.
        attn_implementation (`str`, defaults to `"sdpa"`).
        head_dtype (`torch.dtype`, defaults to `torch.float32`): the head's dtype; `None` keeps the checkpoint's.
    """
    from transformers import Qwen2VLModel

    head_state = {key.removeprefix("head."): value for key, value in state_dict.items() if key.startswith("head.")}
    core = {key.removeprefix("model."): value for key, value in state_dict.items() if key.startswith("model.")}
    stray = sorted(key for key in state_dict if not key.startswith(("head.", "model.", "lm_head.")))
    if stray or not head_state or "language_model.embed_tokens.weight" not in core:
        raise ValueError(
            f"The checkpoint is not a Qwen2-VL reward model in transformers 5's layout: keys {stray[:5]} are unknown, "
            f"{len(head_state)} head tensors, embedding present: {'language_model.embed_tokens.weight' in core}."
        )
    config.text_config.vocab_size = core["language_model.embed_tokens.weight"].shape[0]
    if max(reward_token_ids) >= config.text_config.vocab_size:
        raise ValueError(
            f"The reward token ids {list(reward_token_ids)} do not fit the checkpoint's embedding of "
            f"{config.text_config.vocab_size} rows: use the tokenizer the checkpoint was trained with."
        )
    backbone, info = Qwen2VLModel.from_pretrained(
        None,
        config=config,
        state_dict=core,
        dtype=torch_dtype,
        device_map={"": torch.device(device)},
        quantization_config=eight_bit_config() if load_in_8bit else None,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    names = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    if problems := {name: info[name] for name in names if info.get(name)}:
        raise ValueError(f"The checkpoint does not fit the Qwen2-VL config: {problems}.")
    head = build_head(head_state, head_dtype).to(device)
    return QwenVLRewardModel(backbone, head, reward_token_ids, positions=positions,
                             head_dtype=next(head.parameters()).dtype)  # fmt: skip
