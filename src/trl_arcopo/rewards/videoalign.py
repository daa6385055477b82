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
VideoAlign's reward model, VideoReward ("Improving Video Generation with Human Feedback", Liu et al. 2025): Qwen2-VL-2B
with a linear head read at three special tokens of its prompt, one per dimension: visual quality (VQ), motion quality
(MQ) and text alignment (TA). The paper's reward is their sum, each standardised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .qwen_vl import QwenVLReward, QwenVLRewardModel, load_tensors, load_tokenizer, merge_lora, remap_qwen2vl_keys
from .qwen_vl_inputs import VIDEO_MIN_PIXELS, prompt_criteria, qwen_vl_frame_indices


VIDEOALIGN_DIMENSIONS = ("VQ", "MQ", "TA")
#: The tokens whose hidden states the head scores, in the order of `VIDEOALIGN_DIMENSIONS` (ids 151657-151659 in
#: the released tokenizer, added after Qwen2-VL's vocabulary).
VIDEOALIGN_SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
#: `(mean, std)` of each raw score, from the release's `model_config.json` (`inference_config`): the reference
#: inference reports `(raw - mean) / std`.
VIDEOALIGN_CALIBRATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
#: The per-frame pixel budget the model was trained with (`max_frame_pixels`), 448 × 448.
VIDEOALIGN_MAX_PIXELS = 448 * 448
#: The released LoRA's `lora_alpha / lora_r` (128 / 64).
VIDEOALIGN_LORA_SCALE = 2.0
VIDEOALIGN_BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
_ADAPTER_FILES = ("non_lora_state_dict.pth", "adapter_model.safetensors")

# The prompt the released model was trained with ("detailed_special" in VideoAlign's prompt_template.py, MIT
# license), character for character: the trailing spaces of some lines are part of it.
_CRITERIA = prompt_criteria("video")
_TEMPLATE = "\n".join(
    (
        "",
        (
            "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
            "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
            "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the "
            "others."
        ),
        "",
        "**Visual Quality:**  ",
        (
            "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
            "sub-dimensions should be considered:"
        ),
        *(_CRITERIA[key] for key in ("reasonableness", "clarity", "detail", "aesthetic", "safety")),
        "",
        "Please provide the ratings of Visual Quality: <|VQ_reward|>",
        "END",
        "",
        "**Motion Quality:**  ",
        (
            "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
            "sub-dimensions:"
        ),
        (
            "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
            "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, "
            "textures, or missing body parts)."
        ),
        (
            "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing "
            "should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, "
            "mouth movements)."
        ),
        (
            "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
            "motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing."
        ),
        (
            "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
            "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects."
        ),
        (
            "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
            "where the video might have blurry or unsteady sections that hinder visual continuity."
        ),
        (
            "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion "
            "quality."
        ),
        "",
        "Please provide the ratings of Motion Quality: <|MQ_reward|>",
        "END",
        "",
        "**Text Alignment:**  ",
        _CRITERIA["alignment"],
        _CRITERIA["subject"],
        (
            "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions "
            "like talking or blinking) align with the described prompt. The motion should match the prompt in terms "
            "of type, scale, and direction."
        ),
        (
            "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
            "checking if real-world locations or scenes are accurately represented, though some stylistic adaptation "
            "is acceptable.  "
        ),
        _CRITERIA["style"],
        (
            "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
            "shifts) are consistent with the expected behavior from the prompt."
        ),
        "",
        "Textual prompt - {text_prompt}",
        "Please provide the ratings of Text Alignment: <|TA_reward|>",
        "END",
        "",
    )
)


def videoalign_prompt(prompt: str) -> str:
    """The text VideoReward reads next to the video: its evaluation instructions around `prompt`."""
    return _TEMPLATE.format(text_prompt=prompt)


def remap_videoalign_state_dict(
    state_dict: Mapping[str, torch.Tensor], lora_scale: float = VIDEOALIGN_LORA_SCALE
) -> dict[str, torch.Tensor]:
    """
    The released checkpoint (`checkpoint-*/model.pth`: the state dict of the PEFT-wrapped model, saved with
    transformers 4.45) in transformers 5's layout: the LoRA merged into the language model's linear layers
    (`base_model.model.model.layers.*.{q,k,v,o,gate,up,down}_proj.{base_layer,lora_A.default,lora_B.default}.weight` ->
    `W + lora_scale * B @ A`), then `base_model.model.visual.*` -> `model.visual.*`, `base_model.model.model.*` ->
    `model.language_model.*`, `base_model.model.lm_head.weight` -> `lm_head.weight` and `base_model.model.rm_head.*`
    -> `head.*`. PEFT's adapter files (`lora_A.weight` keys next to a base weight) merge the same way.
    """
    return remap_qwen2vl_keys(merge_lora(state_dict, lora_scale))


class VideoAlignReward(QwenVLReward):
    r"""
    VideoReward on each video: frames sampled at `fps` frames per second (qwen-vl-utils' rule, as in training),
    resized to at most `max_pixels` pixels each, scored on `dimensions`; the reward is the sum of the chosen
    dimensions, each standardised as `(raw - mean) / std` (the reference inference's `use_norm=True`; the paper's
    reward is the sum over all three).

    Args:
        model ([`~trl_arcopo.rewards.qwen_vl.QwenVLRewardModel`]): Qwen2-VL with the linear head (out_dim 1 as
            released, or 3, one column per dimension), reading the tokens of `VIDEOALIGN_SPECIAL_TOKENS`.
        tokenizer: the release's tokenizer (Qwen2-VL's, with the three tokens added).
        dimensions (`str` or `Sequence[str]`, defaults to `("VQ", "MQ", "TA")`): which dimensions are summed.
        fps (`float`, defaults to `2.0`): sampling rate of the frames the model sees.
        video_fps (`float`, defaults to `16.0`): the frame rate of the generated videos (16 for Wan).
        max_pixels (`int`, defaults to `448 * 448`), min_pixels (`int`, defaults to `128 * 28 * 28`): the bounds
            on each frame's pixels after resizing.
        normalize (`bool`, defaults to `True`): standardise each dimension with `calibration`.
        calibration (`Mapping[str, tuple[float, float]]`, *optional*): `(mean, std)` per dimension; defaults to
            `VIDEOALIGN_CALIBRATION`, the release's.
        batch_size (`int`, defaults to `8`): videos per forward pass.
        reference_exact (`bool`, defaults to `False`): resize as the reference inference does, which reads an 8-bit
            video: the frames are rounded to 8-bit levels, resized by torchvision's bicubic antialiased kernel and
            rounded to 8 bits again; `from_pretrained` then also runs the head in the checkpoint's dtype (bfloat16 for
            the release), as the reference does. The default resizes the float frames and runs the head in float32.
    """

    media = "video"
    special_tokens = VIDEOALIGN_SPECIAL_TOKENS
    reference_resample = "uint8"
    reference_head_dtype = None  # the checkpoint's: the reference runs the whole model, head included, in it

    def __init__(
        self,
        model: QwenVLRewardModel,
        tokenizer,
        dimensions: str | Sequence[str] = VIDEOALIGN_DIMENSIONS,
        fps: float = 2.0,
        video_fps: float = 16.0,
        max_pixels: int = VIDEOALIGN_MAX_PIXELS,
        min_pixels: int = VIDEO_MIN_PIXELS,
        normalize: bool = True,
        calibration: Mapping[str, tuple[float, float]] | None = None,
        batch_size: int = 8,
        reference_exact: bool = False,
    ):
        super().__init__(model, tokenizer, min_pixels, max_pixels, batch_size, reference_exact)
        dimensions = (dimensions,) if isinstance(dimensions, str) else tuple(dimensions)
        if (
            not dimensions
            or len(set(dimensions)) != len(dimensions)
            or not set(dimensions) <= set(VIDEOALIGN_DIMENSIONS)
        ):
            raise ValueError(f"`dimensions={dimensions}` must be distinct names among {VIDEOALIGN_DIMENSIONS}.")
        calibration = {**VIDEOALIGN_CALIBRATION, **(calibration or {})}
        self.mean = torch.tensor([calibration[d][0] for d in VIDEOALIGN_DIMENSIONS], dtype=torch.float32)
        self.std = torch.tensor([calibration[d][1] for d in VIDEOALIGN_DIMENSIONS], dtype=torch.float32)
        self.dimensions, self.normalize, self.fps, self.video_fps = dimensions, normalize, fps, video_fps
        self.sample_frames(16)  # checks fps and video_fps now, not at the first rollout
        all_three = set(dimensions) == set(VIDEOALIGN_DIMENSIONS)
        self.__name__ = "videoalign" if all_three else "videoalign_" + "_".join(d.lower() for d in dimensions)

    def sample_frames(self, num_frames: int) -> list[int]:
        """The indices of the frames the model sees in a video of `num_frames` frames."""
        return qwen_vl_frame_indices(num_frames, video_fps=self.video_fps, fps=self.fps)

    def pairs(self, prompts: Sequence[str], videos: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        return videos[:, self.sample_frames(videos.shape[1])], [videoalign_prompt(p) for p in prompts]

    def dimension_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        """The scores `[N, 3]` of VQ, MQ and TA, standardised if `normalize`."""
        raw = self.raw_scores(prompts, videos)  # [N, 3, out_dim]
        if raw.shape[-1] == 1:
            scores = raw[..., 0]
        elif raw.shape[-1] == len(VIDEOALIGN_DIMENSIONS):
            scores = raw.diagonal(dim1=1, dim2=2)  # token i's column i, as the reference reads a 3-column head
        else:
            raise ValueError(f"The head gives {raw.shape[-1]} values per token; VideoAlign's gives 1 (or 3).")
        return (scores - self.mean) / self.std if self.normalize else scores

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        scores = self.dimension_scores(prompts, videos)  # [N, 3]
        chosen = [VIDEOALIGN_DIMENSIONS.index(d) for d in self.dimensions]
        return scores[:, chosen].sum(dim=1).tolist()

    @classmethod
    def read_checkpoint(
        cls, path: Path, base_model: str | os.PathLike | None
    ) -> tuple[dict, str | Path, object, dict]:
        """
        `path` is the VideoReward release (`KlingTeam/VideoReward`, formerly `KwaiVGI/VideoReward`): the folder with
        `model_config.json` and `checkpoint-<step>/` (the highest step is used), or one checkpoint folder in it. A
        checkpoint is `model.pth` (the full state dict) or `adapter_model.safetensors` with `non_lora_state_dict.pth`
        (then the base model's weights are read too); its `tokenizer/` is used. `model_config.json` gives the base
        model (`Qwen/Qwen2-VL-2B-Instruct`), the LoRA scale, `fps`, `max_pixels` and the calibration.
        """
        root, checkpoint, settings = _read_release(path)
        release_base = settings.pop("base_model")
        base = base_model or release_base
        if (checkpoint / "model.pth").exists():
            state = load_tensors(checkpoint / "model.pth")
        elif all((checkpoint / file).exists() for file in _ADAPTER_FILES):
            parts = (_base_weights(base), *(load_tensors(checkpoint / f) for f in _ADAPTER_FILES))
            state = {key.removeprefix("base_model.model."): value for part in parts for key, value in part.items()}
        else:
            raise FileNotFoundError(
                f"{checkpoint} holds neither `model.pth` nor `adapter_model.safetensors` with "
                "`non_lora_state_dict.pth`: give a checkpoint folder of the VideoReward release."
            )
        state = remap_videoalign_state_dict(state, settings.pop("lora_scale"))
        tokenizer_dir = checkpoint / "tokenizer"
        tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir.is_dir() else base, VIDEOALIGN_SPECIAL_TOKENS)
        return state, root if (root / "config.json").exists() else base, tokenizer, settings


def _read_release(path: Path) -> tuple[Path, Path, dict]:
    """The release root, its checkpoint folder, and the settings of `model_config.json` this loader uses."""
    if (path / "model_config.json").exists():
        root = path
        steps = sorted(
            (p for p in path.glob("checkpoint-*") if p.name.rpartition("-")[2].isdigit()),
            key=lambda p: int(p.name.rpartition("-")[2]),
        )
        checkpoint = steps[-1] if steps else path
    elif (path.parent / "model_config.json").exists():
        root, checkpoint = path.parent, path
    else:
        raise FileNotFoundError(
            f"{path} has no `model_config.json`: give the folder of the VideoReward release "
            "(`KlingTeam/VideoReward`), which holds `model_config.json` and `checkpoint-<step>/`."
        )
    config = json.loads((root / "model_config.json").read_text())
    data, model, lora = (config.get(k) or {} for k in ("data_config", "model_config", "peft_lora_config"))
    expected = {
        "prompt_template_type": (data.get("prompt_template_type"), "detailed_special"),
        "eval_dim": (data.get("eval_dim"), list(VIDEOALIGN_DIMENSIONS)),
        "reward_token": (model.get("reward_token"), "special"),
        "sample_type": (data.get("sample_type", "uniform"), "uniform"),
        "num_frames": (data.get("num_frames"), None),
    }
    if wrong := {k: got for k, (got, want) in expected.items() if got != want}:
        raise ValueError(
            f"{root / 'model_config.json'} describes a VideoAlign model this reward does not implement ({wrong}): "
            "it supports the released configuration (the 'detailed_special' prompt, VQ/MQ/TA special tokens, "
            "frames sampled by fps)."
        )
    scale = 0.0
    if lora.get("lora_enable", False):
        rank, alpha = lora.get("lora_r", 64), lora.get("lora_alpha", 128)
        scale = alpha / (rank**0.5 if lora.get("use_rslora", False) else rank)
    base = model.get("model_name_or_path") or VIDEOALIGN_BASE_MODEL
    if os.path.isabs(base) and not os.path.isdir(base):  # a path on the training machine
        base = VIDEOALIGN_BASE_MODEL
    settings = {"base_model": base, "lora_scale": scale}
    settings.update(fps=data.get("fps", 2.0), max_pixels=data.get("max_frame_pixels", VIDEOALIGN_MAX_PIXELS))
    if inference := config.get("inference_config"):
        settings["calibration"] = {d: (inference[f"{d}_mean"], inference[f"{d}_std"]) for d in VIDEOALIGN_DIMENSIONS}
    return root, checkpoint, settings


def _base_weights(base_model: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The base model's safetensors weights, from a local folder or (downloaded) the Hub."""
    folder = Path(base_model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(base_model), allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no `*.safetensors` weights of the base model.")
    return {key: value for file in files for key, value in load_tensors(file).items()}
