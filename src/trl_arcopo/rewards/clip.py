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
CLIP-family rewards on the frames of a video, with a transformers `CLIPModel`: CLIP score, PickScore, and the LAION
aesthetic predictor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io_utils import load_tensors_only
from .frames import CLIP_MEAN, CLIP_STD, frame_indices, resize_center_crop


def _features(output) -> torch.Tensor:
    """transformers 5 returns a `BaseModelOutputWithPooling` from `get_*_features`; older versions a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class FrameEmbedder:
    """
    L2-normalised CLIP image embeddings of the frames of `[N, F, 3, H, W]` videos in `[0, 1]`, selected by a frame
    policy ([`~trl_arcopo.rewards.frames.frame_indices`]) and preprocessed in plain torch: `embed(videos)` -> `[N, K, D]`.
    The policy is checked when the embedder is built, not at the first rollout.
    """

    def __init__(self, model, frames: str = "uniform", num_frames: int = 4, fps: float | None = None,
                 video_fps: float = 16.0, image_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.policy = dict(policy=frames, k=num_frames, fps=fps, video_fps=video_fps)
        frame_indices(num_frames, **self.policy)
        self.image_size = image_size or model.config.vision_config.image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"`videos` must be [N, F, 3, H, W] in [0, 1], got shape {tuple(videos.shape)}.")
        index = frame_indices(videos.shape[1], **self.policy)
        frames = videos[:, index].flatten(0, 1).to(self.model.device)  # [N * K, 3, H, W]
        pixels = resize_center_crop(frames, self.image_size, self.mean, self.std).to(self.model.dtype)
        image = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return F.normalize(image, dim=-1).view(videos.shape[0], len(index), -1)


class CLIPScoreReward:
    r"""
    Text-video alignment: the cosine between the prompt's and each selected frame's CLIP embeddings, averaged over the
    frames, times `scale`. With `use_logit_scale=True` the scale is the model's own `logit_scale.exp()`: that is
    PickScore with the PickScore model (`yuvalkirstain/PickScore_v1` and its `laion/CLIP-ViT-H-14` processor).

    Args:
        model (`transformers.CLIPModel`): the model, on the device the reward should run on (it is put in `eval()`).
        tokenizer: its tokenizer (any transformers tokenizer whose ids the text encoder takes).
        frames (`str`, defaults to `"uniform"`): `"first"`, `"uniform"` (`num_frames` evenly spaced) or `"fps"`
            ([`~trl_arcopo.rewards.frames.frame_indices`]).
        num_frames (`int`, defaults to `4`), fps (`float`, *optional*), video_fps (`float`, defaults to `16`).
        image_size (`int`, *optional*): defaults to the model's `vision_config.image_size`.
        mean, std: the image normalisation (OpenAI CLIP's by default).
        scale (`float`, defaults to `1.0`), use_logit_scale (`bool`, defaults to `False`).
        max_length (`int`, *optional*): text truncation (defaults to the text encoder's positions).
    """

    __name__ = "clip_score"

    def __init__(
        self,
        model,
        tokenizer,
        frames: str = "uniform",
        num_frames: int = 4,
        fps: float | None = None,
        video_fps: float = 16.0,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        scale: float = 1.0,
        use_logit_scale: bool = False,
        max_length: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.frames = FrameEmbedder(model, frames, num_frames, fps, video_fps, image_size, mean, std)
        self.scale, self.use_logit_scale = scale, use_logit_scale
        self.max_length = max_length or model.config.text_config.max_position_embeddings
        if use_logit_scale:
            self.__name__ = "pick_score"

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        device = self.model.device
        image = self.frames.embed(videos)  # [N, K, D]
        text_inputs = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        text = _features(self.model.get_text_features(**text_inputs))
        text = F.normalize(text.float(), dim=-1)  # [N, D]
        cosine = (image * text[:, None]).sum(dim=-1)  # [N, K]
        scale = self.model.logit_scale.exp().float() if self.use_logit_scale else self.scale
        return (cosine.mean(dim=1) * scale).tolist()


class AestheticMLP(nn.Module):
    """
    The LAION aesthetic predictor's head (v2): an MLP from an L2-normalised CLIP image embedding to a score of about
    1-10, with the released layout (`layers.{0,2,4,6,7}`; the dropouts are inactive in `eval()`).
    """

    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticMLP:
    """
    The released head (`sac+logos+ava1-l14-linearMSE.pth`, a state dict) read with `weights_only=True`: tensors only,
    so a crafted file cannot run code. The embedding size is read from the first layer.
    """
    state = load_tensors_only(path, "an aesthetic-predictor state dict")
    if "layers.0.weight" not in state:
        raise ValueError(f"{path} has no `layers.0.weight`: keys {sorted(state)[:5]}...; expected the LAION v2 head.")
    head = AestheticMLP(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


class AestheticReward:
    r"""
    Aesthetic quality: the LAION aesthetic predictor ([`AestheticMLP`] on the L2-normalised CLIP ViT-L/14 image
    embedding) on each selected frame, averaged over the frames, times `scale` (e.g. `0.1` for about `[0, 1]`).

    Args:
        model (`transformers.CLIPModel`): the CLIP model whose image embedding the head was trained on.
        head ([`AestheticMLP`]): e.g. `load_aesthetic_head("sac+logos+ava1-l14-linearMSE.pth")`, on the model's device.
        frames, num_frames, fps, video_fps, image_size, mean, std: as in [`CLIPScoreReward`].
        scale (`float`, defaults to `1.0`).
    """

    __name__ = "aesthetic"

    def __init__(self, model, head: nn.Module, frames: str = "uniform", num_frames: int = 4, fps: float | None = None,
                 video_fps: float = 16.0, image_size: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, scale: float = 1.0):  # fmt: skip
        self.head, self.scale = head.eval().requires_grad_(False), scale
        self.frames = FrameEmbedder(model, frames, num_frames, fps, video_fps, image_size, mean, std)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
        image = self.frames.embed(videos)  # [N, K, D]
        weight = next(self.head.parameters())
        scores = self.head(image.to(weight.device, weight.dtype)).float()  # [N, K]
        return (scores.mean(dim=1) * self.scale).tolist()
