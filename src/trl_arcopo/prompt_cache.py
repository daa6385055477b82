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
"""Prompt embeddings computed once per prompt, with the text encoder optionally kept off the accelerator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from .generator import StreamingGenerator


class PromptEmbeddingCache:
    r"""
    The prompt embeddings of a run, each prompt encoded once and kept on the CPU.

    Training prompts repeat (every epoch, every inner iteration), and the text encoder of a real generator (UMT5-XXL,
    5.7B parameters) is larger than the transformer. So prompts are encoded when first seen and their embeddings
    reused; with `offload=True` the text encoder lives on the CPU and visits the accelerator only to encode prompts
    not seen before, which frees its weights' memory for the rollout. Embeddings computed elsewhere can be
    [`~PromptEmbeddingCache.add`]ed; a pipeline without a text encoder then trains on those prompts.

    Args:
        pipeline ([`~trl_arcopo.generator.StreamingGenerator`]): its `encode_prompt` and `text_encoder`.
        max_sequence_length (`int`, *optional*): text tokens (the pipeline's default when `None`).
        device (`torch.device`): where the embeddings are used (and the text encoder runs).
        offload (`bool`, defaults to `False`): keep the text encoder on the CPU between encodings.

    Example:

    ```py
    >>> cache = PromptEmbeddingCache(pipe, device=torch.device("cpu"))
    >>> embeds = cache(["a red fox jumps", "a cat runs"])  # [2, S, text_dim]
    >>> cache(["a red fox jumps"]) is not None and len(cache) == 2  # encoded once
    ```
    """

    def __init__(
        self,
        pipeline: StreamingGenerator,
        max_sequence_length: int | None = None,
        device: torch.device | str = "cpu",
        offload: bool = False,
    ):
        self.pipeline, self.max_sequence_length = pipeline, max_sequence_length
        self.device, self.offload = torch.device(device), offload
        self._embeds: dict[str, torch.Tensor] = {}  # prompt -> [S, text_dim] on the CPU
        #: Prompts encoded so far (calls of the text encoder count each prompt once).
        self.num_encoded = 0
        if offload and pipeline.text_encoder is not None:
            pipeline.text_encoder.to("cpu")

    def __len__(self) -> int:
        return len(self._embeds)

    def add(self, prompts: list[str], prompt_embeds: torch.Tensor) -> None:
        """
        Store precomputed embeddings `[N, S, text_dim]` of `prompts` (e.g. computed once on another machine): a run
        whose prompts are all added needs no text encoder at all.
        """
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != len(prompts):
            raise ValueError(
                f"`prompt_embeds` must be [N, S, text_dim] with N = {len(prompts)} prompts, got "
                f"{list(prompt_embeds.shape)}."
            )
        for prompt, embed in zip(prompts, prompt_embeds.detach().cpu()):
            self._embeds[prompt] = embed

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """The embeddings `[N, S, text_dim]` of `prompts` on `device`, encoding (in one batch) those not seen before."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeds))
        if missing:
            encoder = self.pipeline.text_encoder
            if self.offload and encoder is not None:
                encoder.to(self.device)
            try:
                embeds, _ = self.pipeline.encode_prompt(
                    missing, max_sequence_length=self.max_sequence_length, device=self.device
                )  # [M, S, text_dim]
            finally:
                if self.offload and encoder is not None:
                    encoder.to("cpu")
            for prompt, embed in zip(missing, embeds.cpu()):
                self._embeds[prompt] = embed
            self.num_encoded += len(missing)
        return torch.stack([self._embeds[p] for p in prompts]).to(self.device)
