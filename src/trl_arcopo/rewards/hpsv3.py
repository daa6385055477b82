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
HPSv3 ("HPSv3: Towards Wide-Spectrum Human Preference Score", Ma et al. 2025), an image preference model: Qwen2-VL-7B
with an MLP head read at one special token, predicting the mean and the spread of a Gaussian preference; the score
is the mean. On a video it scores frames chosen by a frame policy and averages them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .frames import frame_indices
from .qwen_vl import QwenVLReward, QwenVLRewardModel, load_tensors, load_tokenizer, remap_qwen2vl_keys
from .qwen_vl_inputs import prompt_criteria


HPSV3_SPECIAL_TOKEN = "<|Reward|>"
#: HPSv3 resizes every image to about 256 merged tokens: `min_pixels = max_pixels = 256 * 28 * 28`.
HPSV3_PIXELS = 256 * 28 * 28
HPSV3_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_CHECKPOINT = "HPSv3.safetensors"

# The text the released model was trained with (`INSTRUCTION + prompt_with_special_token` of HPSv3's
# data_collator_qwen.py, MIT license), character for character.
_CRITERIA = prompt_criteria("image")
_TEMPLATE = "\n".join(
    (
        "",
        (
            "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
            "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
            "worst and 10 being the best. "
        ),
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
        *(_CRITERIA[key] for key in ("reasonableness", "clarity", "detail", "aesthetic", "safety")),
        "",
        "**Text Alignment:**  ",
        _CRITERIA["alignment"],
        _CRITERIA["subject"],
        _CRITERIA["style"],
        (
            "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
            "image logically fit the scenario described in the prompt. The environment should support and enhance "
            "the subject without contradictions."
        ),
        (
            "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
            "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
            "acceptable, but critical attributes should be preserved."
        ),
        (
            "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
            "the image. The generated content should not introduce elements that conflict with or distort the "
            "original description."
        ),
        "Textual prompt - {text_prompt}\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n",
    )
)


def hpsv3_prompt(prompt: str) -> str:
    """The text HPSv3 reads next to an image: its rating instructions around `prompt`, ending with `<|Reward|>`."""
    return _TEMPLATE.format(text_prompt=prompt)


class HPSv3Reward(QwenVLReward):
    r"""
    HPSv3 on the frames of each video: the frames chosen by the frame policy are each resized to about
    `256 * 28 * 28` pixels and scored as images with the prompt; the reward is the mean over the frames of the
    predicted preference mean (the head's first output; the second, the spread, is not used).

    Args:
        model ([`~trl_arcopo.rewards.qwen_vl.QwenVLRewardModel`]): Qwen2-VL-7B with HPSv3's head (2 outputs),
            reading `<|Reward|>`.
        tokenizer: Qwen2-VL's, with `<|Reward|>` added.
        frames (`str`, defaults to `"uniform"`), num_frames (`int`, defaults to `4`), fps (`float`, *optional*),
            video_fps (`float`, defaults to `16`): the frame policy
            ([`~trl_arcopo.rewards.frames.frame_indices`]), checked now.
        min_pixels, max_pixels (`int`, default to `256 * 28 * 28` each): per-frame pixel bounds, as HPSv3 sets them.
        batch_size (`int`, defaults to `8`): frames per forward pass.
        reference_exact (`bool`, defaults to `False`): resize as the reference inference does, which reads 8-bit
            images with PIL: each frame is rounded to 8-bit levels and resized exactly as PIL's
            `Image.resize(..., BICUBIC)` does (fixed point, 8-bit after each pass; in torch, no PIL needed). The
            head runs in float32 either way, as in the reference. The default resizes the float frames.
    """

    __name__ = "hpsv3"
    media = "image"
    special_tokens = (HPSV3_SPECIAL_TOKEN,)
    reference_resample = "pil"
    reference_head_dtype = torch.float32  # the reference casts its head to float32

    def __init__(self, model: QwenVLRewardModel, tokenizer, frames: str = "uniform", num_frames: int = 4,
                 fps: float | None = None, video_fps: float = 16.0, min_pixels: int = HPSV3_PIXELS,
                 max_pixels: int = HPSV3_PIXELS, batch_size: int = 8, reference_exact: bool = False):  # fmt: skip
        super().__init__(model, tokenizer, min_pixels, max_pixels, batch_size, reference_exact)
        self.policy = dict(policy=frames, k=num_frames, fps=fps, video_fps=video_fps)
        frame_indices(num_frames, **self.policy)

    def pairs(self, prompts: Sequence[str], videos: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        index = frame_indices(videos.shape[1], **self.policy)
        images = videos[:, index].flatten(0, 1)[:, None]  # [N * K, 1, 3, H, W]
        return images, [hpsv3_prompt(prompt) for prompt in prompts for _ in index]

    def frame_scores(self, prompts: Sequence[str], videos: torch.Tensor) -> torch.Tensor:
        """The predicted preference mean of each chosen frame: `[N, K]`."""
        return self.raw_scores(prompts, videos)[:, 0, 0].view(videos.shape[0], -1)

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        return self.frame_scores(prompts, videos).mean(dim=1).tolist()

    @classmethod
    def read_checkpoint(
        cls, path: Path, base_model: str | os.PathLike | None
    ) -> tuple[dict, str | Path, object, dict]:
        """
        `path` is `HPSv3.safetensors` of the release (`MizzenAI/HPSv3`: the reward model's full state dict, keys of
        transformers 4.45 or later; a `.pth` is read with `weights_only=True`) or the folder that holds it. The
        config and tokenizer are `base_model`'s (`Qwen/Qwen2-VL-7B-Instruct` by default), with `<|Reward|>` added.
        """
        file = path / HPSV3_CHECKPOINT if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No HPSv3 checkpoint at {file}: give `HPSv3.safetensors` or its folder.")
        base = base_model or HPSV3_BASE_MODEL
        return remap_qwen2vl_keys(load_tensors(file)), base, load_tokenizer(base, cls.special_tokens), {}
