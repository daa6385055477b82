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
"""Streaming (chunk-by-chunk, KV-cached) text-to-video generation with a Self-Forcing causal Wan transformer."""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..attention_window import check_cache_policy
from ..generator import PromptSchedule, StreamingGeneratorMixin
from ..kv_cache import AnyKVCache, make_cache
from ..latent_frames import latent_num_frames, pixel_frame_range, pixel_num_frames
from ..models.causal_wan import CausalWanTransformer3DModel
from ..models.frame_packing import FramePackingAutoencoder
from ..sampling import RolloutNoise, SamplerType, check_sampler


OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class SelfForcingPipelineOutput(BaseOutput):
    r"""
    Output of [`SelfForcingPipeline`].

    Args:
        frames (`torch.Tensor`, `np.ndarray` or `list[list[PIL.Image.Image]]`):
            `"pt"`: `[B, F, C, H, W]` in `[0, 1]`; `"np"`: `[B, F, H, W, C]`; `"pil"`: lists of images; `"latent"`: the
            latents `[B, C, F_latent, H_latent, W_latent]`.
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def _clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class SelfForcingPipeline(DiffusionPipeline, StreamingGeneratorMixin, WanLoraLoaderMixin):
    r"""
    Text-to-video generation with a streaming autoregressive Wan transformer (Self-Forcing and its family).

    The video is made chunk by chunk (`num_frames_per_chunk` latent frames each). Each chunk is denoised by a few-step
    sampler while attending to a KV cache of the clean chunks before it; the finished chunk is then run once more at
    `t = 0` to commit its clean keys/values to the cache. Without classifier-free guidance (the default) every step is
    one transformer forward.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): tokenizer of the text encoder.
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): UMT5 encoder (or any encoder with
            `last_hidden_state`). Tokenizer and text encoder may be `None` when `prompt_embeds` are always passed.
        transformer ([`CausalWanTransformer3DModel`] or `WanTransformer3DModel`): the causal denoiser. A stock
            `WanTransformer3DModel` is made causal with [`CausalWanTransformer3DModel.from_wan`] (weights shared).
        scheduler ([`~diffusers.FlowMatchEulerDiscreteScheduler`]): gives the denoising schedule;
            `FlowMatchEulerDiscreteScheduler(shift=5.0, stochastic_sampling=True)` for Self-Forcing.
        vae ([`~diffusers.AutoencoderKLWan`] or [`FramePackingAutoencoder`], *optional*): the video VAE. `None` means
            the transformer works directly in pixel space (values in `[-1, 1]`, `in_channels` = 3);
            `FramePackingAutoencoder` packs pixel frames into channels, losslessly.
        default_height, default_width, default_num_frames (`int`): video size used when `__call__` gets none.
        default_max_sequence_length (`int`): text tokens used when `__call__` gets none.
        default_sampler (`str`, defaults to `"consistency"`): the sampler used when `__call__` (or the trainer) gets
            none: `"consistency"` for Self-Forcing (distilled for it), `"ode"` for models trained by plain flow
            matching such as the Moving Shapes generator.
        default_sigmas (`list[float]`, *optional*): the per-chunk schedule (before the scheduler's shift) used when
            none is given; `None` is Self-Forcing's `[1.0, 0.75, 0.5, 0.25]`.
        default_num_frames_per_chunk (`int`, defaults to 3): latent frames per chunk when `__call__` (or the trainer)
            gets none (Self-Forcing: 3).
        default_first_chunk_sigmas (`list[float]`, *optional*): the first chunk's schedule when it differs from the
            others' (Causal-Forcing++: 4 steps for the first chunk, 1 or 2 after); `None`: every chunk uses the same.
        cache_policy (`str`, defaults to `"full"`): how the KV cache of the committed chunks is kept (see
            [`~trl_arcopo.kv_cache.make_cache`]): `"full"` (every committed frame, Self-Forcing), `"rolling"` (the sink
            frames and a window of recent frames in a ring, LongLive), or `"recompute"` (clean latents of the sink and
            window frames, keys and values rebuilt at relative positions every chunk, Krea realtime).
        local_attn_frames (`int`, *optional*): frames a chunk attends to, itself included (the sink frames plus the
            most recent ones); `None`: every committed frame. Needed by `"rolling"`.
        sink_frames (`int`, defaults to 0): frames at the start of the video that stay visible under the window.

    Example:

    ```py
    >>> from trl_arcopo import SelfForcingPipeline
    >>> pipe = SelfForcingPipeline.from_pretrained("path/to/self-forcing-diffusers")
    >>> video = pipe("a red fox running through snow", generator=torch.Generator().manual_seed(0)).frames[0]
    ```
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "vae"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: PreTrainedModel | None,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLWan | FramePackingAutoencoder | None = None,
        default_height: int = 480,
        default_width: int = 832,
        default_num_frames: int = 81,
        default_max_sequence_length: int = 512,
        default_sampler: str = "consistency",
        default_sigmas: list[float] | None = None,
        default_num_frames_per_chunk: int = 3,
        default_first_chunk_sigmas: list[float] | None = None,
        cache_policy: str = "full",
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ):
        super().__init__()
        check_sampler(default_sampler, "default_sampler")
        check_cache_policy(cache_policy, local_attn_frames, sink_frames)
        transformer = CausalWanTransformer3DModel.from_wan(transformer)
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, vae=vae
        )
        self.register_to_config(
            default_height=default_height,
            default_width=default_width,
            default_num_frames=default_num_frames,
            default_max_sequence_length=default_max_sequence_length,
            default_sampler=default_sampler,
            default_sigmas=list(default_sigmas) if default_sigmas is not None else None,
            default_num_frames_per_chunk=default_num_frames_per_chunk,
            default_first_chunk_sigmas=list(default_first_chunk_sigmas) if default_first_chunk_sigmas else None,
            cache_policy=cache_policy,
            local_attn_frames=local_attn_frames,
            sink_frames=sink_frames,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 1
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 1
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ text
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = False,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Encode prompts once (the cross-attention context of every chunk).

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each `[B * num_videos_per_prompt, max_sequence_length, text_dim]`
            (text tokens past each prompt's length are zero, as in Wan); the second is `None` without guidance.
        """
        device = device or self._execution_device
        max_sequence_length = max_sequence_length or self.config.default_max_sequence_length
        if prompt_embeds is None:
            prompt_embeds = self._embed_text(prompt, max_sequence_length, device, dtype)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype or prompt_embeds.dtype)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"Got {len(negative_prompt)} negative prompts for {batch_size} prompts; pass one per prompt."
                )
            negative_prompt_embeds = self._embed_text(negative_prompt, prompt_embeds.shape[1], device, dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=prompt_embeds.dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    @torch.no_grad()  # the text encoder is frozen; the same embeddings with or without autograd
    def _embed_text(self, prompt, max_sequence_length, device, dtype) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "This pipeline has no tokenizer/text encoder: pass `prompt_embeds` instead of `prompt`, or load a "
                "pipeline with a text encoder."
            )
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt = [_clean_prompt(p) for p in prompt]
        inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1)
        encoder_device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(inputs.input_ids.to(encoder_device), mask.to(encoder_device)).last_hidden_state
        hidden = hidden.to(device=device, dtype=dtype or self.transformer.dtype)  # [B, S, text_dim]
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < seq_lens.to(hidden.device)[:, None]
        return hidden * keep[..., None]  # zero past each prompt's length  [B, S, text_dim]

    # ------------------------------------------------------------------ shapes and inputs
    def pixel_frame_range(self, start: int, stop: int) -> tuple[int, int]:
        """
        The decoded video's frames `[start', stop')` made from the latent frames `[start, stop)`: Wan's VAE makes
        frame 0 of latent frame 0 and frames `4f - 3 .. 4f` of latent frame `f`; a `FramePackingAutoencoder` frames
        `t·f .. t·f + t - 1`; without a VAE, the same frames.
        """
        return pixel_frame_range(start, stop, self.vae_scale_factor_temporal, self._frame_packing)

    @property
    def _frame_packing(self) -> bool:  # e.g. `FramePackingAutoencoder`: `t` frames per latent frame, no causal frame
        return hasattr(self.vae, "latent_num_frames")

    def latent_shape(
        self, batch_size: int, height: int, width: int, num_frames: int, num_frames_per_chunk: int
    ) -> tuple[int, int, int, int, int]:
        """Validate a video size and return its latent shape `(B, C, F_latent, H_latent, W_latent)`."""
        _, p_h, p_w = self.transformer.config.patch_size
        spatial = self.vae_scale_factor_spatial * p_h, self.vae_scale_factor_spatial * p_w
        if height % spatial[0] or width % spatial[1]:
            raise ValueError(
                f"`height={height}` and `width={width}` must be divisible by {spatial[0]} and {spatial[1]} "
                f"(VAE factor {self.vae_scale_factor_spatial} x patch size {p_h}x{p_w}); e.g. use "
                f"{height // spatial[0] * spatial[0] or spatial[0]}x{width // spatial[1] * spatial[1] or spatial[1]}."
            )
        if num_frames_per_chunk < 1:
            raise ValueError(f"`num_frames_per_chunk={num_frames_per_chunk}` must be at least 1.")
        t, packing = self.vae_scale_factor_temporal, self._frame_packing
        latent_frames = latent_num_frames(num_frames, t, packing)
        if latent_frames % num_frames_per_chunk:
            valid = (latent_frames // num_frames_per_chunk + 1) * num_frames_per_chunk
            suggestion = pixel_num_frames(valid, t, packing)
            raise ValueError(
                f"`num_frames={num_frames}` gives {latent_frames} latent frames, not a multiple of "
                f"`num_frames_per_chunk={num_frames_per_chunk}`; use e.g. `num_frames={suggestion}`."
            )
        channels = self.transformer.config.in_channels
        return (
            batch_size,
            channels,
            latent_frames,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )

    def prepare_cache(
        self,
        batch_size: int,
        num_latent_frames: int,
        latent_height: int,
        latent_width: int,
        local_attn_frames: int | None = None,
        sink_frames: int | None = None,
    ) -> AnyKVCache:
        """
        Start an empty KV cache of the pipeline's `cache_policy` for `batch_size` videos of the given latent size,
        able to commit `num_latent_frames` frames: a video's frames less its last chunk, which is never committed.
        `local_attn_frames` and `sink_frames` default to the pipeline config's.
        """
        config = self.config
        if local_attn_frames is None:
            local_attn_frames = getattr(config, "local_attn_frames", None)
        if sink_frames is None:
            sink_frames = getattr(config, "sink_frames", 0)
        layout = self.transformer.cache_layout(latent_height, latent_width, device=self._execution_device)
        policy = getattr(config, "cache_policy", "full")
        return make_cache(policy, layout, batch_size, num_latent_frames, local_attn_frames, sink_frames)

    # ------------------------------------------------------------------ the network calls
    def velocity(
        self,
        x: torch.Tensor,
        timestep: float | torch.Tensor,
        prompt_embeds: torch.Tensor,
        kv_cache: AnyKVCache,
        frame_offset: int,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        update_cache: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """
        The flow velocity `[B, C, Fc, H, W]` of the chunk `x` starting at latent frame `frame_offset`, reading the
        committed frames of `kv_cache` (with `update_cache=True`, also writing the chunk's keys and values); with
        `negative_prompt_embeds`, classifier-free guidance at `guidance_scale`. `transformer` replaces
        `self.transformer` for the call. The one network call of [`~trl_arcopo.StreamingGeneratorMixin`].
        """
        dtype = self.transformer.dtype
        kv_cache, frame_offset = kv_cache.attention_cache(frame_offset)  # the keys a chunk reads, its RoPE position
        guided = negative_prompt_embeds is not None
        model_input = torch.cat([x, x]) if guided else x  # [B or 2B, C, Fc, H, W]
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
        timesteps = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).expand(model_input.shape[0])
        velocity = (transformer or self.transformer)(
            model_input.to(dtype),
            timesteps,
            embeds.to(dtype),
            attention_kwargs=attention_kwargs,
            kv_cache=kv_cache,
            frame_offset=frame_offset,
            update_cache=update_cache,
            return_dict=False,
        )[0].to(x.dtype)
        if guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance_scale * (cond - uncond)
        return velocity

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pt", batch_size: int | None = None):
        """
        Latents `[B, C, F, H, W]` to frames (`"pt"`: `[B, F, C, H, W]` in `[0, 1]`; see the output class).
        `batch_size` decodes that many videos per VAE call (as diffusers' `enable_vae_slicing`), so that the decoder's
        memory does not grow with `B`; `None` decodes every video in one call.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown `output_type={output_type!r}`; use one of {OUTPUT_TYPES}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size={batch_size}` must be at least 1 (or None: every video at once).")
        if output_type == "latent":
            return latents
        if self.vae is None:
            video = latents  # pixel space, [-1, 1]
        else:
            z_dim = self.vae.config.z_dim
            mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents)
            inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents)
            step = batch_size or latents.shape[0]
            video = torch.cat(
                [
                    self.vae.decode((part / inv_std + mean).to(self.vae.dtype), return_dict=False)[0].float()
                    for part in latents.split(step)
                ]
            )  # [B, C, F, H, W]
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

    # ------------------------------------------------------------------ __call__
    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        output_type: str,
        sampler: str,
        guidance_scale: float = 1.0,
        num_videos_per_prompt: int = 1,
    ) -> None:
        """Refuse, before any work, arguments `__call__` cannot use, with an error naming the value and the fix."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown `output_type={output_type!r}`; use one of {OUTPUT_TYPES}.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt is not None and not isinstance(prompt, str | list):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        check_sampler(sampler)
        if not guidance_scale >= 1.0:
            raise ValueError(f"`guidance_scale={guidance_scale}` must be at least 1 (1 disables guidance).")
        if num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt={num_videos_per_prompt}` must be at least 1.")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_frames_per_chunk: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        max_sequence_length: int | None = None,
        sampler: SamplerType | None = None,
        local_attn_frames: int | None = None,
        sink_frames: int | None = None,
        callback_on_chunk_end: Callable[[SelfForcingPipeline, int], None] | None = None,
        prompt_switches: dict[int, str | list[str]] | None = None,
        recache_on_switch: bool = True,
        prompt_interpolation_chunks: int = 1,
    ) -> SelfForcingPipelineOutput | tuple:
        r"""
        Generate videos chunk by chunk.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompt(s); or pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): used only with `guidance_scale > 1`.
            height, width, num_frames (`int`, *optional*): video size (defaults from the pipeline config).
                `num_frames` counts output frames: with Wan's VAE it must be `4k + 1`, with a
                `FramePackingAutoencoder` a multiple of its `scale_factor_temporal`.
            num_frames_per_chunk (`int`, *optional*): latent frames per chunk; defaults to the pipeline's
                `default_num_frames_per_chunk`.
            sigmas (`list[float]`, *optional*): the per-chunk schedule before the scheduler's shift; defaults to the
                pipeline's `default_sigmas`, else
                Self-Forcing's `[1.0, 0.75, 0.5, 0.25]` (timesteps `[1000, 937.5, 833.3, 625]` with shift 5).
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance; `1.0` disables it (Self-Forcing).
            generator (`torch.Generator` or a list, *optional*): draws the initial noise (unless `latents` is given),
                then the re-noise of each chunk, chunk by chunk, in order.
            latents (`torch.Tensor` of shape `[B, C, F_latent, H_latent, W_latent]`, *optional*): the initial noise.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            sampler (`str`, *optional*): `"consistency"` (re-noise, Self-Forcing) or `"ode"`; defaults to the
                pipeline's `default_sampler`.
            local_attn_frames, sink_frames: a local attention window with sink frames (see [`KVCache`]); default to the
                pipeline config's (`None`: global attention).
            callback_on_chunk_end (`Callable`, *optional*): called as `callback_on_chunk_end(pipeline, chunk_index)`
                after each chunk is committed to the KV cache and before the next one starts, e.g. to switch a LoRA
                adapter off for the chunks that follow (`pipeline.transformer.disable_adapters()`).
            prompt_switches (`dict[int, str | list[str]]`, *optional*): interactive generation: from chunk `c` on,
                the prompt is `prompt_switches[c]` (one per prompt of `prompt`).
            recache_on_switch (`bool`, defaults to `True`): at a switch, re-encode the sink and recent frames under the
                new prompt (LongLive); see [`~trl_arcopo.generator.PromptSchedule`].
            prompt_interpolation_chunks (`int`, defaults to 1): blend the old prompt into the new one over this many
                chunks (Krea realtime); `1` switches at once.

        Returns:
            [`SelfForcingPipelineOutput`] or a tuple `(frames,)`.
        """
        # 1. Defaults and input checks
        height = height or self.config.default_height
        width = width or self.config.default_width
        num_frames = num_frames or self.config.default_num_frames
        if num_frames_per_chunk is None:
            num_frames_per_chunk = getattr(self.config, "default_num_frames_per_chunk", 3)
        sampler = sampler or getattr(self.config, "default_sampler", "consistency")
        self.check_inputs(prompt, prompt_embeds, output_type, sampler, guidance_scale, num_videos_per_prompt)

        # 2. Text embeddings
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        encode = functools.partial(self.encode_prompt, num_videos_per_prompt=num_videos_per_prompt, device=device)
        prompt_embeds, negative_prompt_embeds = encode(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_cfg,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        schedule = None
        if prompt_switches:  # each switch's prompt, as long and in the dtype of the first
            switches = {
                chunk: encode(text, max_sequence_length=prompt_embeds.shape[1], dtype=prompt_embeds.dtype)[0]
                for chunk, text in prompt_switches.items()
            }
            for chunk, embeds in switches.items():
                if embeds.shape != prompt_embeds.shape:
                    raise ValueError(
                        f"`prompt_switches[{chunk}]` gives {embeds.shape[0]} prompts for {prompt_embeds.shape[0]} "
                        "videos: pass one prompt per prompt of `prompt`."
                    )
            schedule = PromptSchedule(switches, recache_on_switch, prompt_interpolation_chunks)
        # 3. Schedule and every noise of the rollout, drawn up front
        batch_size = prompt_embeds.shape[0]
        shape = self.latent_shape(batch_size, height, width, num_frames, num_frames_per_chunk)
        timesteps, sigmas_t = self.get_schedule(sigmas)
        first_chunk = self.get_first_chunk_schedule()  # Causal-Forcing++: the first chunk's own steps
        steps = max(len(timesteps), len(first_chunk[0]) if first_chunk else 0)
        noise = RolloutNoise.sample(shape, num_frames_per_chunk, steps, sampler, generator, latents, device=device)

        # 4. The KV cache of the committed chunks
        cache = self.prepare_cache(
            batch_size * (2 if do_cfg else 1), shape[2] - num_frames_per_chunk, shape[3], shape[4], local_attn_frames,
            sink_frames,
        )  # fmt: skip

        # 5. Chunk by chunk: denoise, then commit to the cache
        video_latents = self.generate_latents(
            prompt_embeds,
            noise,
            cache,
            timesteps,
            sigmas_t,
            sampler,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            attention_kwargs=attention_kwargs,
            progress=True,
            callback_on_chunk_end=callback_on_chunk_end,
            first_chunk_schedule=first_chunk,
            prompt_schedule=schedule,
        )
        # 6. Decode
        frames = self.decode_latents(video_latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return SelfForcingPipelineOutput(frames=frames)
