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

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from diffusers.training_utils import cast_training_params
from huggingface_hub import HfApi
from peft import LoraConfig, PeftConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerState, set_seed
from transformers.trainer import OPTIMIZER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from transformers.utils.hub import PushInProgress
from trl.trainer.utils import RepeatSampler

from .arcopo_config import ARCoPOConfig
from .hub import (
    LORA_WEIGHT_NAME,
    PUSH_ALLOW_PATTERNS,
    create_model_card,
    load_lora_adapter_weights,
    save_lora_adapter,
)
from .kv_cache import KVCache
from .loss import LossStats, arcopo_loss, group_advantages, sde_grpo_loss, sde_transition_log_prob
from .pipelines import SelfForcingPipeline
from .replay_buffer import BufferEntry, ReplayBuffer, rebuild_prefix_cache
from .rollout import forked_rollout
from .sampling import RolloutNoise, neighbor_noise


logger = logging.get_logger(__name__)

#: A reward function: `fn(prompts, videos, **kwargs) -> list[float | None]`, with `videos` `[N, F, C, H, W]` in
#: `[0, 1]`, one value per video; `None` means "no opinion". Extra dataset columns arrive as keyword lists.
RewardFunc = Callable[..., list[float | None]]

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@dataclass
class RolloutBatch:
    r"""
    One rollout of `N` prompt groups, everything the localised update needs.

    Args:
        prompts (`list[str]`): the `N` prompts.
        prompt_embeds (`torch.Tensor` of shape `[N, S, text_dim]`).
        pivot (`int`): the chunk where the groups forked.
        frame_offset (`int`): first latent frame of the pivot chunk.
        prefix_cache ([`KVCache`]): committed chunks `< pivot`, batch `N` (detached).
        states (`torch.Tensor` of shape `[N, G, T, C, Fc, H, W]`): pivot-chunk states `x_t` of every candidate.
        x0_preds (`torch.Tensor` of shape `[N, G, T, C, Fc, H, W]`): their old clean predictions `x̂0`.
        rewards (`torch.Tensor` of shape `[N, G]`): combined sequence-level rewards.
        advantages (`torch.Tensor` of shape `[N, G]`).
        temperature (`torch.Tensor` of shape `[N, T]`): `τ` of each group and step.
        timesteps (`torch.Tensor` of shape `[T]`), sigmas (`torch.Tensor` of shape `[T + 1]`).
        prefix_latents (`torch.Tensor` of shape `[N, C, pivot * Fc, H, W]`, *optional*): the clean chunks before the
            pivot (what the replay buffer stores to rebuild `prefix_cache`).
        nonfinite (`str`, *optional*): why this rollout cannot train (a NaN or infinite latent, reward, advantage or
            temperature); every update on it is skipped. `None` when everything is finite.
    """

    prompts: list[str]
    prompt_embeds: torch.Tensor
    pivot: int
    frame_offset: int
    prefix_cache: KVCache
    states: torch.Tensor
    x0_preds: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    temperature: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    prefix_latents: torch.Tensor | None = None
    nonfinite: str | None = None

    def save(self, path: str) -> None:
        """
        Write the rollout, prefix KV cache included, to one safetensors file (atomically): what a checkpoint taken
        between two inner iterations needs to resume exactly.
        """
        tensors = {
            "prompt_embeds": self.prompt_embeds,
            "states": self.states,
            "x0_preds": self.x0_preds,
            "rewards": self.rewards,
            "advantages": self.advantages,
            "temperature": self.temperature,
            "timesteps": self.timesteps,
            "sigmas": self.sigmas,
        }
        for i, (key, value) in enumerate(zip(self.prefix_cache.keys, self.prefix_cache.values)):
            tensors[f"prefix_cache.keys.{i}"], tensors[f"prefix_cache.values.{i}"] = key, value
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        metadata = {
            "prompts": json.dumps(self.prompts),
            "pivot": str(self.pivot),
            "frame_offset": str(self.frame_offset),
            "nonfinite": json.dumps(self.nonfinite),
            "prefix_cache": json.dumps(
                {
                    "num_layers": self.prefix_cache.num_layers,
                    "tokens_per_frame": self.prefix_cache.tokens_per_frame,
                    "end": self.prefix_cache.end,
                    "local_attn_frames": self.prefix_cache.local_attn_frames,
                    "sink_frames": self.prefix_cache.sink_frames,
                }
            ),
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> RolloutBatch:
        """Read a rollout written by [`~RolloutBatch.save`] (safetensors: no code runs while loading)."""
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        cache = json.loads(metadata["prefix_cache"])
        layers = range(cache.pop("num_layers"))
        prefix_cache = KVCache(
            keys=[tensors.pop(f"prefix_cache.keys.{i}") for i in layers],
            values=[tensors.pop(f"prefix_cache.values.{i}") for i in layers],
            **cache,
        )
        return cls(
            prompts=json.loads(metadata["prompts"]),
            pivot=int(metadata["pivot"]),
            frame_offset=int(metadata["frame_offset"]),
            prefix_cache=prefix_cache,
            nonfinite=json.loads(metadata["nonfinite"]),
            **tensors,
        )

    def to_buffer_entries(self) -> list[BufferEntry]:
        """One compact [`BufferEntry`] per group (no KV cache: `prefix_latents` rebuilds it)."""
        if self.prefix_latents is None:
            raise ValueError("This rollout did not keep `prefix_latents`; it cannot go into a replay buffer.")
        return [
            BufferEntry(
                prompt=prompt,
                prompt_embeds=self.prompt_embeds[i],
                pivot=self.pivot,
                prefix_latents=self.prefix_latents[i],
                states=self.states[i],
                x0_preds=self.x0_preds[i],
                rewards=self.rewards[i],
            )
            for i, prompt in enumerate(self.prompts)
        ]


class EpochRepeatSampler(RepeatSampler):
    """
    TRL's `RepeatSampler` whose shuffle depends only on `(seed, epoch)`: a run resumed in a later epoch draws the
    prompts the uninterrupted run drew (the base class advances one generator per pass, from the start of a process).
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


@contextmanager
def reference_policy(transformer: torch.nn.Module):
    """The frozen base (the reference policy): the LoRA adapters disabled for the duration of the block."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def median_pairwise_distance(x0: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """
    Median distance between the predictions of different candidates: `x0` `[N, G, T, *]` -> `[N, T]`. Used as the
    automatic temperature; it depends only on the stored (old) predictions, so it is constant during the update.
    """
    n, g, t = x0.shape[:3]
    flat = x0.float().transpose(1, 2).reshape(n * t, g, -1)  # [N * T, G, D]
    d = torch.cdist(flat, flat).pow(2)  # [N * T, G, G]
    if reduction == "mean":
        d = d / flat.shape[-1]
    off_diagonal = ~torch.eye(g, dtype=torch.bool, device=x0.device)
    med = d[:, off_diagonal].median(dim=-1).values  # [N * T]
    return med.clamp_min(1e-12).view(n, t)  # [N, T]


class ARCoPOTrainer(Trainer):
    r"""
    Trainer for AR-CoPO ([AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy
    Optimization](https://huggingface.co/papers/2603.17461)): on-policy alignment of a streaming autoregressive video
    generator with sequence-level rewards.

    Every rollout forks each prompt's generation at one chunk into `num_generations` candidates that differ only in
    that chunk's initial noise, scores the finished videos, and runs `num_iterations` updates of a clipped contrastive
    (Neighbor GRPO) objective on that chunk alone. The policy is a LoRA adapter on `pipeline.transformer`; the
    reference is the same transformer with the adapter disabled.

    Args:
        pipeline ([`SelfForcingPipeline`]): the streaming generator.
        reward_funcs (`RewardFunc` or `list[RewardFunc]`): `fn(prompts, videos, **kwargs) -> list[float | None]`.
        args ([`ARCoPOConfig`], *optional*): defaults to `ARCoPOConfig("arcopo-output")`.
        train_dataset ([`~datasets.Dataset`]): needs a `"prompt"` column; other columns reach the rewards.
        eval_dataset ([`~datasets.Dataset`], *optional*): evaluated by rolling out groups and logging their rewards.
        peft_config ([`~peft.LoraConfig`], *optional*): the adapter to train. Without it, an adapter already on the
            transformer is trained, or a default LoRA (r=64, alpha=128, attention and FFN projections) is added.
        callbacks, optimizers: as in [`~transformers.Trainer`].

    Example:

    ```py
    >>> trainer = ARCoPOTrainer(pipeline=pipe, reward_funcs=[my_reward], args=ARCoPOConfig("out"), train_dataset=ds)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "arcopo"]
    _name = "AR-CoPO"

    def __init__(
        self,
        pipeline: SelfForcingPipeline,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: ARCoPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: PeftConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
    ):
        # Args
        if args is None:
            args = ARCoPOConfig("arcopo-output")
        if not isinstance(pipeline, SelfForcingPipeline):
            raise TypeError(f"`pipeline` must be a SelfForcingPipeline, got {type(pipeline).__name__}.")

        # Reward functions
        if not isinstance(reward_funcs, list | tuple):
            reward_funcs = [reward_funcs]
        if not reward_funcs or not all(callable(f) for f in reward_funcs):
            raise ValueError("`reward_funcs` must be a callable or a non-empty list of callables.")
        self.reward_funcs = list(reward_funcs)
        self.reward_func_names = [getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs]
        if args.reward_weights is None:
            self.reward_weights = torch.ones(len(self.reward_funcs))
        elif len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} values but there are {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)}); give one weight per function."
            )
        else:
            self.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)

        # Datasets
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is None:
                continue
            if "prompt" not in (dataset.column_names or []):
                raise ValueError(
                    f"`{name}` has no 'prompt' column (columns: {dataset.column_names}); rename the text column, "
                    "e.g. `dataset.rename_column('text', 'prompt')`."
                )
            if isinstance(dataset, Dataset) and len(dataset) == 0:
                raise ValueError(f"`{name}` has no rows: give at least one prompt.")
            feature = (dataset.features or {}).get("prompt")
            if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
                raise ValueError(
                    f"The 'prompt' column of `{name}` holds {feature} values, not text: give one string per row "
                    "(e.g. `dataset.cast_column('prompt', Value('string'))`)."
                )
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a datasets.Dataset with a 'prompt' column.")
        prompts_per_step = args.per_device_train_batch_size * args.world_size
        if isinstance(train_dataset, Dataset) and len(train_dataset) < prompts_per_step:
            raise ValueError(
                f"`train_dataset` has {len(train_dataset)} prompts but one step takes {prompts_per_step} "
                f"(`per_device_train_batch_size={args.per_device_train_batch_size}` x {args.world_size} processes); "
                "lower `per_device_train_batch_size` or add prompts."
            )

        # Video size (validated now, before any rollout)
        self.pipeline = pipeline
        config = pipeline.config
        self.video_size = (
            args.height or config.default_height,
            args.width or config.default_width,
            args.num_frames or config.default_num_frames,
        )
        if args.num_frames_per_chunk is None:
            args.num_frames_per_chunk = getattr(config, "default_num_frames_per_chunk", 3)
        self.latent_shape = pipeline.latent_shape(1, *self.video_size, args.num_frames_per_chunk)
        self.num_chunks = self.latent_shape[2] // args.num_frames_per_chunk
        if args.pivot_chunk is not None and args.pivot_chunk >= self.num_chunks:
            raise ValueError(
                f"`pivot_chunk={args.pivot_chunk}` but the video has {self.num_chunks} chunks; use an index in "
                f"[0, {self.num_chunks}) or None (uniform)."
            )
        self.timesteps, self.sigmas = pipeline.get_schedule(args.denoising_sigmas)
        trainable = len(self.timesteps) - (1 if args.loss_type == "sde_grpo" else 0)
        if args.train_denoising_steps is not None and max(args.train_denoising_steps) >= trainable:
            raise ValueError(
                f"`train_denoising_steps={list(args.train_denoising_steps)}` but the schedule has "
                f"{len(self.timesteps)} steps"
                + (" and `sde_grpo` cannot train the last one" if args.loss_type == "sde_grpo" else "")
                + f": use indices in [0, {trainable})."
            )
        self.sampler = args.sampler or getattr(config, "default_sampler", "consistency")
        if args.loss_type == "sde_grpo" and self.sampler != "consistency":
            raise ValueError(
                f"`loss_type='sde_grpo'` explores through the consistency sampler's re-noise, but the sampler is "
                f"{self.sampler!r} (the pipeline's `default_sampler`): set `sampler='consistency'`."
            )

        # Model and PEFT: the policy is a LoRA adapter, the frozen base is the reference
        transformer = pipeline.transformer
        loaded = list(transformer.peft_config) if getattr(transformer, "_hf_peft_config_loaded", False) else []
        adapter_name = args.adapter_name
        if adapter_name is None:
            if peft_config is None and loaded:
                adapter_name = transformer.active_adapters()[0]
            else:
                adapter_name = "semi" if args.training_mode == "semi_on_policy" else "on_policy"
        # LoRA's A matrices are drawn from the global RNG. `Trainer.__init__` seeds it, but only after this point:
        # seed it here, so the same `seed` gives the same adapter (and the same run) in every launch.
        set_seed(args.seed)
        if peft_config is not None:
            if not isinstance(peft_config, PeftConfig):
                raise TypeError(f"`peft_config` must be a peft.PeftConfig, got {type(peft_config).__name__}.")
            if adapter_name in loaded:
                raise ValueError(
                    f"The transformer already has an adapter named {adapter_name!r} and a `peft_config` was given: "
                    f"set `adapter_name` to a new name, or pass no `peft_config` to keep training {adapter_name!r}."
                )
            transformer.add_adapter(peft_config, adapter_name=adapter_name)
        elif adapter_name not in loaded:
            logger.info(f"No `peft_config`: adding a LoRA adapter {adapter_name!r} with r=64, alpha=128 (paper).")
            transformer.add_adapter(
                LoraConfig(r=64, lora_alpha=128, target_modules=DEFAULT_LORA_TARGETS), adapter_name=adapter_name
            )
        transformer.set_adapter(adapter_name)  # only the trained adapter is active; others stay loaded, unused
        self.adapter_name = adapter_name
        check_trainable_peft_config(transformer.peft_config[adapter_name], adapter_name)
        if transformer.peft_config[adapter_name].modules_to_save:
            logger.warning(
                f"The adapter trains full copies of {transformer.peft_config[adapter_name].modules_to_save} "
                "(`modules_to_save`). diffusers' `load_lora_weights` refuses such files: load the saved adapter with "
                "`trl_arcopo.hub.load_lora_adapter_weights` after `transformer.add_adapter(the same LoraConfig)`."
            )
        for name, param in transformer.named_parameters():
            # LoRA factors (and DoRA magnitudes) and `modules_to_save` copies of this adapter; nothing of the base
            param.requires_grad_(f".{adapter_name}." in name and ("lora_" in name or ".modules_to_save." in name))
        if args.disable_dropout:
            for module in transformer.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        cast_training_params(transformer, dtype=torch.float32)
        if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()  # diffusers' checkpointing of the transformer blocks
            args.activation_checkpointing = args.gradient_checkpointing = False  # Trainer's is transformers-only
        for module in (pipeline.text_encoder, pipeline.vae):
            if module is not None:
                module.requires_grad_(False).eval()

        super().__init__(
            model=transformer,
            args=args,
            data_collator=lambda features: features,  # rows stay a list of dicts, like TRL's GRPO
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        pipeline.to(self.accelerator.device)

        # Metrics and state
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list), "collect": defaultdict(list)}
        self._step = 0
        self._buffered_rollout: RolloutBatch | None = None
        #: Groups of `num_generations` videos rolled out, by who made them: the policy being trained (`"policy"`),
        #: the reference for the replay buffer (`"reference"`), the policy during evaluation (`"eval"`).
        self.rollout_counts = {"policy": 0, "reference": 0, "eval": 0}
        self.replay_buffer: ReplayBuffer | None = None
        self._replay_buffer_source: str | None = None  # the file holding exactly the in-memory buffer
        if args.training_mode == "semi_on_policy":
            if not isinstance(train_dataset, Dataset):
                raise ValueError(
                    "`training_mode='semi_on_policy'` collects its replay buffer from a map-style `datasets.Dataset`; "
                    f"got {type(train_dataset).__name__}."
                )
            capacity = math.ceil(args.replay_buffer_size / self.accelerator.num_processes)
            self.replay_buffer = ReplayBuffer(capacity)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

        # Failure handling: non-finite steps are skipped (see `_skip_nonfinite_step`)
        #: Every skipped optimizer step of this process's run: `{"step": int, "reason": str}`.
        self.skipped_steps: list[dict[str, Any]] = []
        self._pending_skip: str | None = None  # why the optimizer step being accumulated must be skipped
        self._consecutive_skips = 0
        self._resume_checkpoint: str | None = None
        self.add_callback(_NonFiniteGuard(self))

    # ------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochRepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,
            batch_size=self.args.per_device_train_batch_size * self.accelerator.num_processes,
            repeat_count=self.args.num_iterations,
            shuffle=True,
            seed=self.args.seed,
        )

    def _rng(self, purpose: int, device: torch.device | str | None = None, step: int | None = None) -> torch.Generator:
        """A generator that depends only on (seed, step, rank, purpose): rollouts replay exactly after a resume."""
        step = self.state.global_step if step is None else step
        seed = self.args.seed * 1_000_003 + step * 10_007 + self.accelerator.process_index * 101
        generator = torch.Generator(device=self.accelerator.device if device is None else device)
        generator.manual_seed((seed * 13 + purpose) % (2**63))
        return generator

    # ------------------------------------------------------------------ rollout and rewards
    @torch.no_grad()
    def _generate_and_score(
        self, inputs: list[dict[str, Any]], mode: str = "train", generator: torch.Generator | None = None
    ) -> RolloutBatch:
        """
        Roll out one forked group per prompt and score it. `mode` is `"train"` or `"eval"` (the current policy) or
        `"collect"` (the caller has disabled the adapter: reference rollouts for the replay buffer).
        """
        args = self.args
        device = self.accelerator.device
        pipe = self.pipeline
        prompts = [row["prompt"] for row in inputs]
        n, g, steps = len(prompts), args.num_generations, len(self.timesteps)
        if generator is None:
            generator = self._rng(purpose=1 if mode == "train" else 3)
        self.rollout_counts[{"train": "policy", "eval": "eval", "collect": "reference"}[mode]] += n

        start = time.perf_counter()
        prompt_embeds, _ = pipe.encode_prompt(prompts, max_sequence_length=args.max_sequence_length, device=device)
        shape = (n, *self.latent_shape[1:])
        noise = RolloutNoise.sample(shape, args.num_frames_per_chunk, steps, self.sampler, generator, device=device)
        if args.pivot_chunk is not None:
            pivot = args.pivot_chunk
        else:
            pivot = int(torch.randint(self.num_chunks, (1,), generator=generator, device=device).item())
        base = noise.chunk_initial(pivot)  # [N, C, Fc, H, W]
        branch_renoise = None
        if args.loss_type == "arcopo":
            branch_noise = neighbor_noise(base, g, args.fork_noise_scale, generator)  # [N * G, C, Fc, H, W]
        else:  # SDE-GRPO: same initial noise, each candidate its own re-noise at the pivot chunk
            branch_noise = base.repeat_interleave(g, dim=0)
            branch_renoise = torch.randn(
                (n * g, *noise.chunk_renoise(pivot).shape[1:]), generator=generator, device=device
            )

        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        group = forked_rollout(
            pipe,
            prompt_embeds,
            noise,
            pivot,
            branch_noise,
            self.timesteps,
            self.sigmas,
            shape[3],
            shape[4],
            self.sampler,
            branch_renoise,
        )
        transformer.train(was_training)
        videos = pipe.decode_latents(group.latents, output_type="pt")  # [N * G, F, C, H, W]
        rollout_seconds = time.perf_counter() - start
        nonfinite = None
        if not torch.isfinite(group.latents).all():
            nonfinite = (
                f"the rollout's latents are not finite (pivot chunk {pivot}): the policy's predictions overflowed"
            )

        start = time.perf_counter()
        if nonfinite is None:
            rewards_per_func, nonfinite = self._calculate_rewards(inputs, prompts, videos)  # [N * G, n_funcs]
        else:  # rewards are not asked to judge non-finite videos
            rewards_per_func = torch.full(
                (n * g, len(self.reward_funcs)), math.nan, dtype=torch.float64, device=device
            )
        rewards = self._combine_rewards(rewards_per_func).view(n, g)  # [N, G] float64
        reward_seconds = time.perf_counter() - start
        if nonfinite is None and not torch.isfinite(rewards).all():
            largest = rewards_per_func.abs().nan_to_num(0.0).amax(dim=0)  # [n_funcs]
            nonfinite = (
                "the weighted sum of the rewards overflowed (largest |value| per function: "
                + ", ".join(f"{name}={v:.3g}" for name, v in zip(self.reward_func_names, largest.tolist()))
                + ")"
            )

        if torch.isfinite(rewards).all():
            advantages = group_advantages(rewards, args.scale_rewards, args.quasi_norm_p)  # [N, G] float64
        else:  # the step is skipped; zero advantages keep the (discarded) update finite
            advantages = torch.zeros_like(rewards)
        if nonfinite is None and not torch.isfinite(advantages).all():
            nonfinite = "the advantages are not finite"
        advantages = advantages.float()
        states = group.states.unflatten(0, (n, g))  # [N, G, T, C, Fc, H, W]
        x0_preds = group.x0_preds.unflatten(0, (n, g))  # [N, G, T, C, Fc, H, W]
        temperature = self._temperature(x0_preds)  # [N, T]
        if nonfinite is None and not (torch.isfinite(temperature).all() and (temperature > 0).all()):
            nonfinite = f"the temperature is not a positive finite number (got {temperature.flatten()[0].item()})"
        if nonfinite is not None:
            if mode == "collect":
                raise ValueError(
                    f"A reference rollout for the replay buffer (prompt {prompts[0]!r}, ...) cannot be used: {nonfinite}."
                )
            logger.warning(f"Rollout at step {self.state.global_step} ({mode}): {nonfinite}.")

        # Metrics (TRL names)
        metrics = self._metrics[mode]
        metrics["reward"].append(rewards.mean().item())
        metrics["reward_std"].append(rewards.std(dim=1).mean().item())
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(column).item())
            opinions = column[~column.isnan()]
            metrics[f"rewards/{name}/std"].append(opinions.std().item() if opinions.numel() > 1 else math.nan)
        metrics["frac_reward_zero_std"].append((rewards.std(dim=1) < 1e-8).float().mean().item())
        metrics["advantages/abs_mean"].append(advantages.abs().mean().item())
        metrics["advantages/max"].append(advantages.max().item())
        metrics["advantages/min"].append(advantages.min().item())
        metrics["pivot_chunk"].append(float(pivot))
        metrics["temperature"].append(temperature.mean().item())
        metrics["timing/rollout_seconds"].append(rollout_seconds)
        metrics["timing/reward_seconds"].append(reward_seconds)
        if args.log_completions and self.accelerator.is_main_process and mode == "train":
            self._save_completions(prompts[0], videos[:g], rewards[0])

        frame_offset = pivot * args.num_frames_per_chunk
        return RolloutBatch(
            prompts=prompts,
            prompt_embeds=prompt_embeds,
            pivot=pivot,
            frame_offset=frame_offset,
            prefix_cache=group.prefix_cache,
            states=states,
            x0_preds=x0_preds.clone(),
            rewards=rewards,
            advantages=advantages,
            temperature=temperature,
            timesteps=self.timesteps,
            sigmas=self.sigmas,
            prefix_latents=group.latents.unflatten(0, (n, g))[:, 0, :, :frame_offset].clone()
            if mode == "collect"
            else None,
            nonfinite=nonfinite,
        )

    def _temperature(self, x0_preds: torch.Tensor) -> torch.Tensor:
        """`τ` `[N, T]` of groups with predictions `x0_preds` `[N, G, T, *]`: fixed, or their median distance."""
        n, steps = x0_preds.shape[0], x0_preds.shape[2]
        if self.args.temperature is None:
            return median_pairwise_distance(x0_preds, self.args.distance_reduction)
        return torch.full((n, steps), self.args.temperature, device=x0_preds.device)

    def _calculate_rewards(
        self, inputs: list[dict[str, Any]], prompts: list[str], videos: torch.Tensor
    ) -> tuple[torch.Tensor, str | None]:
        """
        Call every reward function once on all videos. Returns the rewards `[N * G, n_funcs]` in float64 (`None`
        becomes NaN) and, if a function returned NaN or an infinity, which one and where (else `None`).
        """
        g = self.args.num_generations
        prompts_rep = [p for p in prompts for _ in range(g)]
        keys = [k for k in inputs[0] if k != "prompt"]
        kwargs = {k: [row[k] for row in inputs for _ in range(g)] for k in keys}
        out = torch.full((len(prompts_rep), len(self.reward_funcs)), math.nan, dtype=torch.float64)
        nonfinite = None
        for i, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = func(prompts=prompts_rep, videos=videos, trainer_state=self.state, **kwargs)
            if values is None or len(values) != len(prompts_rep):
                got = "None" if values is None else len(values)
                raise ValueError(
                    f"Reward function `{name}` returned {got} values for {len(prompts_rep)} videos (prompt "
                    f"{prompts_rep[0]!r}, ...): return one float (or None) per video."
                )
            for j, value in enumerate(values):
                if value is None:
                    continue
                if not (isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)):
                    raise ValueError(
                        f"Reward function `{name}` returned {value!r} ({type(value).__name__}) for video {j} of prompt "
                        f"{prompts_rep[j]!r}: return one float (or None) per video."
                    )
                value = float(value)
                if not math.isfinite(value):
                    if nonfinite is None:
                        nonfinite = (
                            f"reward function `{name}` returned {value} for video {j} of prompt {prompts_rep[j]!r} "
                            "(rewards must be finite; return None for 'no opinion')"
                        )
                    continue
                out[j, i] = value
        return out.to(self.accelerator.device), nonfinite

    def _combine_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """Weighted sum over the functions that gave an opinion; a video without any opinion gets its group's mean."""
        weights = self.reward_weights.to(rewards_per_func.device, rewards_per_func.dtype)
        weighted = rewards_per_func * weights  # [N * G, n_funcs]
        combined = torch.nansum(weighted, dim=1)  # [N * G]
        no_opinion = rewards_per_func.isnan().all(dim=1)  # [N * G]
        if no_opinion.any():
            grouped = combined.view(-1, self.args.num_generations).clone()  # [N, G]
            mask = no_opinion.view_as(grouped)
            grouped[mask] = float("nan")
            fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0)  # [N, 1]
            grouped = torch.where(mask, fill.expand_as(grouped), grouped)
            combined = grouped.flatten()
        return combined

    def _save_completions(self, prompt: str, videos: torch.Tensor, rewards: torch.Tensor) -> None:
        from diffusers.utils import export_to_gif
        from PIL import Image

        folder = os.path.join(self.args.output_dir, "completions")
        os.makedirs(folder, exist_ok=True)
        grid = torch.cat(list(videos.float().cpu()), dim=-1)  # [F, C, H, G * W]
        frames = (grid.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        export_to_gif(
            [Image.fromarray(f) for f in frames], os.path.join(folder, f"step_{self.state.global_step:06d}.gif")
        )
        with open(os.path.join(folder, f"step_{self.state.global_step:06d}.txt"), "w") as f:
            f.write(f"{prompt}\nrewards: {[round(r, 4) for r in rewards.tolist()]}\n")

    # ------------------------------------------------------------------ semi-on-policy: the replay buffer
    def _replay_buffer_file(self, folder: str | None = None) -> str:
        """This process's buffer file: `replay_buffer.pt` (`replay_buffer-rank{i}.pt` with several processes)."""
        suffix = "" if self.accelerator.num_processes == 1 else f"-rank{self.accelerator.process_index}"
        if folder is None and self.args.replay_buffer_path is not None:
            root, ext = os.path.splitext(self.args.replay_buffer_path)
            return f"{root}{suffix}{ext or '.pt'}"
        return os.path.join(folder or self.args.output_dir, f"replay_buffer{suffix}.pt")

    def _check_replay_buffer(self, buffer: ReplayBuffer, source: str) -> None:
        expected = (
            self.args.num_generations,
            len(self.timesteps),
            self.latent_shape[1],
            self.args.num_frames_per_chunk,
        )
        for entry in buffer.entries:
            got = (*entry.states.shape[:3], entry.states.shape[3])
            if got != expected or entry.pivot >= self.num_chunks:
                raise ValueError(
                    f"The replay buffer {source} was collected with (num_generations, denoising steps, channels, "
                    f"frames per chunk) = {got} and pivot {entry.pivot}, but this run has {expected} and "
                    f"{self.num_chunks} chunks: delete the file or point `replay_buffer_path` elsewhere to collect a "
                    "new buffer."
                )

    def _ensure_replay_buffer(self) -> None:
        """Fill the replay buffer once: from `replay_buffer_path` if it exists, else by reference rollouts."""
        buffer = self.replay_buffer
        if len(buffer) >= buffer.capacity:
            return
        args = self.args
        path = self._replay_buffer_file()
        start = time.perf_counter()
        if os.path.exists(path):
            loaded = ReplayBuffer.load(path)
            self._check_replay_buffer(loaded, f"in {path}")
            self.replay_buffer = buffer = loaded
            self._replay_buffer_source = path
            logger.info(f"Loaded a replay buffer of {len(buffer)} groups from {path}.")
        else:
            dataset = self.train_dataset
            rank = self.accelerator.process_index
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed * 7919 + rank))
            per_batch = args.per_device_train_batch_size
            unwrapped = self.accelerator.unwrap_model(self.model)
            progress = tqdm(
                total=buffer.capacity,
                initial=len(buffer),
                desc="Collecting reference rollouts",
                unit="group",
                disable=not self.is_local_process_zero(),
            )
            with reference_policy(unwrapped):
                batch_index = 0
                while len(buffer) < buffer.capacity:
                    take = min(per_batch, buffer.capacity - len(buffer))
                    rows = [dataset[int(order[(batch_index * per_batch + i) % len(order)])] for i in range(take)]
                    # independent of global_step: re-collecting after a crash gives the same buffer
                    generator = self._rng(purpose=5 + batch_index, step=0)
                    for entry in self._generate_and_score(
                        rows, mode="collect", generator=generator
                    ).to_buffer_entries():
                        buffer.add(entry)
                    progress.update(take)
                    batch_index += 1
            progress.close()
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            buffer.save(path)
            self._replay_buffer_source = path
            logger.info(f"Collected a replay buffer of {len(buffer)} reference groups; saved to {path}.")
        collect = self._metrics["collect"]
        metrics = self._metrics["train"]
        for key in ("reward", "reward_std"):
            if collect.get(key):
                metrics[f"buffer/{key}"].append(sum(collect[key]) / len(collect[key]))
        collect.clear()
        metrics["buffer/groups"].append(float(len(buffer)))
        informative = len(buffer.informative_indices())
        metrics["buffer/frac_reward_zero_std"].append(1 - informative / len(buffer))
        if informative == 0 and args.replay_buffer_informative_only:
            raise ValueError(
                f"Every one of the {len(buffer)} replay-buffer groups in {path} has equal rewards (zero advantage), "
                "so semi-on-policy training has nothing to learn from. Collect a larger or more varied buffer: raise "
                "`replay_buffer_size` or `num_generations`, or widen the neighbour noise (`fork_noise_scale`), "
                "after deleting the file."
            )
        metrics["buffer/memory_mb"].append(buffer.nbytes / 2**20)
        metrics["buffer/disk_mb"].append(os.path.getsize(path) / 2**20 if os.path.exists(path) else 0.0)
        metrics["buffer/seconds"].append(time.perf_counter() - start)

    def _rollout_from_entries(self, entries: list[BufferEntry]) -> RolloutBatch:
        """A [`RolloutBatch`] of buffer groups with one pivot; the prefix cache is rebuilt by the reference policy."""
        args = self.args
        device = self.accelerator.device
        unwrapped = self.accelerator.unwrap_model(self.model)
        with reference_policy(unwrapped):
            cache = rebuild_prefix_cache(self.pipeline, list(entries), args.num_frames_per_chunk, self.latent_shape[2])
        states = torch.stack([e.states for e in entries]).to(device)  # [N, G, T, C, Fc, H, W]
        x0_preds = torch.stack([e.x0_preds for e in entries]).to(device)  # [N, G, T, C, Fc, H, W]
        rewards = torch.stack([e.rewards for e in entries]).to(device)  # [N, G]
        temperature = self._temperature(x0_preds)  # [N, T]
        advantages = group_advantages(rewards.double(), args.scale_rewards, args.quasi_norm_p)  # [N, G] float64
        nonfinite = None
        if not torch.isfinite(advantages).all():
            nonfinite = "the advantages of replay-buffer groups are not finite"
        elif not (torch.isfinite(temperature).all() and (temperature > 0).all()):
            nonfinite = f"the temperature is not a positive finite number (got {temperature.flatten()[0].item()})"
        return RolloutBatch(
            prompts=[e.prompt for e in entries],
            prompt_embeds=torch.stack([e.prompt_embeds for e in entries]).to(device),
            pivot=entries[0].pivot,
            frame_offset=entries[0].pivot * args.num_frames_per_chunk,
            prefix_cache=cache,
            states=states,
            x0_preds=x0_preds,
            rewards=rewards,
            advantages=advantages.float(),
            temperature=temperature,
            timesteps=self.timesteps,
            sigmas=self.sigmas,
            nonfinite=nonfinite,
        )

    def _sample_from_buffer(self) -> list[RolloutBatch]:
        """`per_device_train_batch_size` distinct buffer groups, batched by pivot chunk."""
        informative_only = self.args.replay_buffer_informative_only
        available = len(self.replay_buffer.informative_indices()) if informative_only else len(self.replay_buffer)
        n = min(self.args.per_device_train_batch_size, available)
        entries = self.replay_buffer.sample(
            n, generator=self._rng(purpose=4, device="cpu"), informative_only=informative_only
        )
        by_pivot: dict[int, list[BufferEntry]] = defaultdict(list)
        for entry in entries:
            by_pivot[entry.pivot].append(entry)
        return [self._rollout_from_entries(by_pivot[p]) for p in sorted(by_pivot)]

    # ------------------------------------------------------------------ training step
    def _prepare_inputs(self, inputs: list[dict[str, Any]]) -> RolloutBatch:
        if self._step % self.args.num_iterations == 0 or self._buffered_rollout is None:
            self._buffered_rollout = self._generate_and_score(inputs)
        return self._buffered_rollout

    def training_step(self, model: torch.nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._step == 0 and self.state.global_step > 0:  # resumed: continue the micro-step count
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
            if self._between_iterations():  # the checkpoint was taken between two updates on one rollout
                path = self._rollout_file(self._resume_checkpoint)
                self._buffered_rollout = RolloutBatch.load(path, device=self.accelerator.device)
        model.train()
        if self.args.training_mode == "semi_on_policy":
            # exploitation: groups of the reference policy from the buffer; the current policy is never rolled out
            self._ensure_replay_buffer()
            batches = self._sample_from_buffer()
            for batch in batches:
                if batch.nonfinite is not None:
                    self._flag_nonfinite(batch.nonfinite)
            total_groups = sum(len(b.prompts) for b in batches)
            start = time.perf_counter()
            loss = sum(
                self._compute_loss(
                    model, b, iteration=None, weight=len(b.prompts) / total_groups, final=i == len(batches) - 1
                )
                for i, b in enumerate(batches)
            )
        else:
            rollout = self._prepare_inputs(inputs)
            if rollout.nonfinite is not None:
                self._flag_nonfinite(rollout.nonfinite)
            iteration = self._step % self.args.num_iterations
            start = time.perf_counter()
            loss = self._compute_loss(model, rollout, iteration)
        self._metrics["train"]["timing/update_seconds"].append(time.perf_counter() - start)
        self._step += 1
        if self._pending_skip is not None:  # this step is skipped: its loss is not a loss of the run
            loss = torch.full_like(loss, math.nan)
        return loss

    # ------------------------------------------------------------------ failure handling
    def _flag_nonfinite(self, reason: str) -> None:
        """Mark the optimizer step being accumulated as skipped; the first cause is the one reported."""
        if self._pending_skip is None:
            self._pending_skip = reason

    def _skip_nonfinite_step(self) -> None:
        """
        Called right before each optimizer step. If a quantity of this step was not finite, or the gradient is not,
        drop the gradients so that the optimizer leaves the weights and its state untouched, log the step, and stop
        after `max_nonfinite_steps` consecutive skips. Processes agree: one process's reason skips the step on all.
        """
        params = [p for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        reason, self._pending_skip = self._pending_skip, None
        if reason is None:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                reason = "the gradient is not finite"
        skip = torch.tensor(float(reason is not None), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            skip = self.accelerator.reduce(skip, reduction="sum")
        self._metrics["train"]["step_skipped"].append(float(skip.item() > 0))
        if skip.item() == 0:
            self._consecutive_skips = 0
            return
        reason = reason or "another process found a non-finite value"
        for param in params:
            param.grad = None  # an optimizer skips parameters without a gradient: no update, no state change
        step = self.state.global_step + 1
        self.skipped_steps.append({"step": step, "reason": reason})
        self._consecutive_skips += 1
        logger.warning(f"Skipped optimizer step {step}: {reason}.")
        limit = self.args.max_nonfinite_steps
        if self._consecutive_skips >= limit:
            recent = "; ".join(f"step {s['step']}: {s['reason']}" for s in self.skipped_steps[-limit:])
            raise RuntimeError(
                f"Training stopped: {limit} consecutive optimizer steps (`max_nonfinite_steps={limit}`) were skipped "
                f"because a value was NaN or infinite ({recent}). The weights and checkpoints hold the last finite "
                f"state. {_nonfinite_fix(reason)}"
            )

    def _check_adapter_finite(self, when: str) -> None:
        for name, param in self.adapter_state_dict().items():
            if not torch.isfinite(param).all():
                raise RuntimeError(
                    f"The adapter parameter {name} is not finite {when} (step {self.state.global_step}); nothing was "
                    "saved. Lower `learning_rate` or set `max_grad_norm`, and resume from the last checkpoint."
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError("ARCoPOTrainer computes its loss in `training_step` (one backward per step).")

    def _compute_loss(
        self,
        model: torch.nn.Module,
        rollout: RolloutBatch,
        iteration: int | None,
        weight: float = 1.0,
        final: bool = True,
    ) -> torch.Tensor:
        """
        The localised update on the pivot chunk: for each denoising step, the current policy's `x̂0` at `K` anchors
        (fresh each inner iteration), the objective, and one backward. Returns the detached total loss.

        `iteration` is the inner iteration of an on-policy rollout, or `None` for buffer groups (semi-on-policy): then
        `π_old` is the reference, whose anchor predictions are recomputed here with the adapter disabled, batched as
        the current policy's, so that the ratio is exactly 1 while the adapter is still zero. The loss is scaled by
        `weight` (the share of this batch in the step); gradients are synchronised after the `final` backward.
        """
        args = self.args
        n, g, steps = rollout.states.shape[:3]
        k = args.num_anchors
        generator = self._rng(purpose=2)
        anchor_index = torch.stack(
            [torch.randperm(g, generator=generator, device=generator.device)[:k] for _ in range(n)]
        ).to(rollout.states.device)  # [N, K]
        rows = anchor_index + torch.arange(n, device=anchor_index.device)[:, None] * g  # [N, K] into N * G
        cache = rollout.prefix_cache.fork(k)  # [N * K] rows, the prefix shared by the anchors of a group
        embeds = rollout.prompt_embeds.repeat_interleave(k, dim=0)  # [N * K, S, text_dim]
        unwrapped = self.accelerator.unwrap_model(model)
        trained_steps = range(steps) if args.loss_type == "arcopo" else range(steps - 1)
        if args.train_denoising_steps is not None:
            trained_steps = sorted(args.train_denoising_steps)
        scale = weight / len(trained_steps) / self.current_gradient_accumulation_steps
        total = torch.zeros((), device=rollout.states.device)
        stats: list[LossStats] = []
        penalties = []
        for position, j in enumerate(trained_steps):
            x_t = rollout.states[:, :, j].flatten(0, 1)[rows.flatten()]  # [N * K, C, Fc, H, W]
            x0_old = rollout.x0_preds[:, :, j]  # [N, G, C, Fc, H, W]
            x0_ref = None
            if iteration is None or args.beta > 0:
                with torch.no_grad(), reference_policy(unwrapped):
                    x0_ref = self.pipeline.predict_x0(
                        x_t, rollout.timesteps[j], rollout.sigmas[j].item(), embeds, cache, rollout.frame_offset
                    )  # [N * K, C, Fc, H, W]
            if iteration is None:  # semi-on-policy: π_old is the reference, at the anchors recomputed right here
                x0_old = x0_old.clone()
                x0_old.view(n * g, *x0_old.shape[2:])[rows.flatten()] = x0_ref.to(x0_old.dtype)
            last = final and position == len(trained_steps) - 1
            sync = nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                x0_theta = self.pipeline.predict_x0(
                    x_t,
                    rollout.timesteps[j],
                    rollout.sigmas[j].item(),
                    embeds,
                    cache,
                    rollout.frame_offset,
                    transformer=model,
                )  # [N * K, C, Fc, H, W]
                if iteration == 0:
                    # θ == θ_old: refresh the anchors' stored predictions with this exact computation, so that the
                    # first ratio is exactly 1 whatever the batching of the rollout was.
                    flat = rollout.x0_preds[:, :, j].flatten(0, 1)  # [N * G, C, Fc, H, W] (a view)
                    flat[rows.flatten()] = x0_theta.detach().to(flat.dtype)
                x0_theta = x0_theta.unflatten(0, (n, k))  # [N, K, C, Fc, H, W]
                if args.loss_type == "arcopo":
                    loss, step_stats = arcopo_loss(
                        x0_theta,
                        x0_old,
                        anchor_index,
                        rollout.advantages,
                        epsilon=args.epsilon,
                        temperature=rollout.temperature[:, j],
                        reduction=args.distance_reduction,
                        clip=args.ratio_clip,
                        delta=args.delta,
                    )
                else:
                    sigma_next = rollout.sigmas[j + 1].item()
                    x_next = rollout.states[:, :, j + 1].flatten(0, 1)[rows.flatten()]  # [N * K, C, Fc, H, W]
                    x0_old_anchor = x0_old.flatten(0, 1)[rows.flatten()]  # [N * K, C, Fc, H, W]
                    log_prob = sde_transition_log_prob(x_next, x0_theta.flatten(0, 1), sigma_next).view(n, k)
                    old_log_prob = sde_transition_log_prob(x_next, x0_old_anchor, sigma_next).view(n, k)
                    adv = rollout.advantages.gather(1, anchor_index)  # [N, K]
                    loss, step_stats = sde_grpo_loss(
                        log_prob, old_log_prob, adv, epsilon=args.epsilon, clip=args.ratio_clip, delta=args.delta
                    )
                if args.beta > 0:
                    penalty = (x0_theta.float() - x0_ref.unflatten(0, (n, k)).float()).pow(2).mean()
                    penalties.append(penalty.item())
                    loss = loss + args.beta * penalty
                if not torch.isfinite(loss):
                    self._flag_nonfinite(f"the loss is {loss.item()} at denoising step {j} (pivot {rollout.pivot})")
                # backward even then: every process runs the same collectives; the step's gradients are dropped
                self.accelerator.backward(loss * scale)
            total += loss.detach() * scale
            stats.append(step_stats)

        metrics = self._metrics["train"]
        step_dicts = [s.to_dict() for s in stats]
        for key in step_dicts[0]:
            values = [d[key] for d in step_dicts]
            reducer = min if key.endswith("min") else max if key.endswith("max") else (lambda v: sum(v) / len(v))
            metrics[key].append(reducer(values))
            if iteration == 0:
                metrics[f"first_step/{key}"].append(reducer(values))
        if penalties:
            metrics["kl"].append(sum(penalties) / len(penalties))
        return total

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained adapter's parameters (PEFT names), detached."""
        transformer = self.accelerator.unwrap_model(self.model)
        return {n: p.detach() for n, p in transformer.named_parameters() if f".{self.adapter_name}." in n}

    def check_adapters_in_sync(self) -> bool:
        """
        Check, across all processes, that every rank holds the same adapter weights (what DDP guarantees); raise a
        `RuntimeError` if not. Returns `True` and logs the check on a single process too.
        """
        flat = torch.cat([p.flatten().float() for p in self.adapter_state_dict().values()])  # [num_lora_params]
        gathered = self.accelerator.gather(flat[None])  # [num_processes, num_lora_params]
        max_diff = (gathered - gathered[:1]).abs().max().item()
        if max_diff != 0:
            raise RuntimeError(f"The adapters differ across processes (max |diff| = {max_diff}).")
        logger.warning(f"Adapter weights are identical on all {self.accelerator.num_processes} process(es).")
        return True

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._generate_and_score(inputs, mode="eval")
        return torch.zeros((), device=self.accelerator.device), None, None

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            values = [v for v in values if not math.isnan(v)]
            if values:
                metrics[key] = sum(values) / len(values)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        else:
            metrics["skipped_steps"] = float(len(self.skipped_steps))
            skipped = metrics.pop("step_skipped", None)
            if skipped == 1.0 and "loss" in logs:  # every step of this window was skipped: it has no loss
                logs = {**logs, "loss": math.nan}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ saving, loading, model card
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        self._check_adapter_finite("when saving")
        os.makedirs(output_dir, exist_ok=True)
        transformer = self.accelerator.unwrap_model(self.model)
        save_lora_adapter(transformer, output_dir, adapter_name=self.adapter_name)
        torch.save(args_without_token(self.args), os.path.join(output_dir, "training_args.bin"))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        sample_videos: bool = False,
        **kwargs,
    ):
        """
        Save the adapter and its model card, then upload those two files (`PUSH_ALLOW_PATTERNS`) to
        `args.hub_model_id`, and nothing else of `output_dir`: not the checkpoints, the replay buffer, logs or
        `training_args.bin`. `sample_videos=True` adds the sample videos of `log_completions` (`completions/*.gif`).
        `kwargs` go to [`~ARCoPOTrainer.create_model_card`] (e.g. `dataset_name`).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None:
            model_name = (self.args.hub_model_id or self.args.output_dir.rstrip("/")).split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            revision=revision if revision is not None else self.args.hub_revision,
            allow_patterns=PUSH_ALLOW_PATTERNS + ([SAMPLE_VIDEO_PATTERN] if sample_videos else []),
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`hub_strategy` pushes during training upload the same two files as [`~ARCoPOTrainer.push_to_hub`]."""
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        for name in PUSH_ALLOW_PATTERNS:  # the checkpoint's adapter (and card) become output_dir's
            source = os.path.join(checkpoint_folder, name)
            if os.path.isfile(source):
                shutil.copy(source, os.path.join(self.args.output_dir, name))
        job = HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=f"Training in progress, step {self.state.global_step}",
            token=self.args.hub_token,
            run_as_future=True,
            revision=self.args.hub_revision,
            allow_patterns=PUSH_ALLOW_PATTERNS,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        transformer = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_lora_adapter_weights(transformer, resume_from_checkpoint, adapter_name=self.adapter_name)
        if self.replay_buffer is not None:
            path = self._replay_buffer_file(resume_from_checkpoint)
            if os.path.exists(path):
                buffer = ReplayBuffer.load(path)
                self._check_replay_buffer(buffer, f"in {path}")
                self.replay_buffer = buffer
            else:
                logger.warning(f"{path} not found: the replay buffer will be loaded or collected again.")

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        if self.args.should_save:
            # `trainer_state.json` is written last: a folder holding a readable one is complete. A leftover from a
            # save of the same step that was killed must not vouch for the files about to be written.
            stale = os.path.join(folder, TRAINER_STATE_NAME)
            if os.path.exists(stale):
                os.remove(stale)
            self.create_model_card(model_name=os.path.basename(self.args.output_dir.rstrip("/")))
        self._save_rollout_state(folder)
        self._save_replay_buffer_copy(folder)
        super()._save_checkpoint(model, trial)

    def _between_iterations(self) -> bool:
        """Whether the next micro-step updates on the buffered rollout instead of making a new one."""
        return self.args.training_mode == "on_policy" and self._step % self.args.num_iterations != 0

    def _rollout_file(self, folder: str) -> str:
        """This process's buffered-rollout file in a checkpoint folder."""
        suffix = "" if self.accelerator.num_processes == 1 else f"-rank{self.accelerator.process_index}"
        return os.path.join(folder, f"{ROLLOUT_NAME}{suffix}.safetensors")

    def _save_rollout_state(self, folder: str) -> None:
        """Between two updates on one rollout, the checkpoint carries that rollout: a resume continues on it."""
        path = self._rollout_file(folder)
        if self._between_iterations() and self._buffered_rollout is not None:
            self._buffered_rollout.save(path)
        elif os.path.exists(path):  # left by a killed save of this step in another run
            os.remove(path)

    def _save_replay_buffer_copy(self, folder: str) -> None:
        if self.replay_buffer is None or not len(self.replay_buffer):
            return
        # the buffer never changes once collected: hard-link its file when possible (no extra disk), else write
        dest, source = self._replay_buffer_file(folder), self._replay_buffer_file()
        tmp = f"{dest}.tmp-{os.getpid()}"
        try:
            if source == self._replay_buffer_source and os.path.exists(source):
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
                os.replace(tmp, dest)
            else:
                self.replay_buffer.save(dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # ------------------------------------------------------------------ resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        As [`~transformers.Trainer.train`]. `resume_from_checkpoint=True` takes the newest *complete* checkpoint of
        `output_dir`, skipping (with a warning naming them) folders a killed save left incomplete; a path is checked
        the same way and refused with the list of what is missing. Temporary files a killed save left behind in
        `output_dir` are removed first.
        """
        if self.is_world_process_zero() and os.path.isdir(self.args.output_dir):
            remove_stale_temporaries(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._last_complete_checkpoint()
        elif isinstance(resume_from_checkpoint, str | os.PathLike):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            problems = self.checkpoint_problems(resume_from_checkpoint)
            if problems:
                raise ValueError(
                    f"Cannot resume from {resume_from_checkpoint}: {'; '.join(problems)}. Resume from an earlier "
                    "checkpoint, or pass `resume_from_checkpoint=True` to take the newest complete one."
                )
        self._resume_checkpoint = resume_from_checkpoint or None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def checkpoint_problems(self, folder: str) -> list[str]:
        """What keeps `folder` from resuming this run exactly (an empty list: it can)."""
        if not os.path.isdir(folder):
            return [f"{folder} is not a folder"]
        try:
            state = TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE_NAME))
        except (OSError, ValueError) as error:
            return [
                f"its {TRAINER_STATE_NAME} is missing or unreadable ({type(error).__name__}): the save was cut off"
            ]
        problems = []
        if not _readable_safetensors(os.path.join(folder, LORA_WEIGHT_NAME)):
            problems.append(f"its adapter {LORA_WEIGHT_NAME} is missing or truncated")
        distributed_state = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if not (
            self.args.save_only_model or distributed_state or os.path.isfile(os.path.join(folder, OPTIMIZER_NAME))
        ):
            problems.append(f"it has no {OPTIMIZER_NAME}")
        micro_steps = state.global_step * self.args.gradient_accumulation_steps
        if self.args.training_mode == "on_policy" and micro_steps % self.args.num_iterations != 0:
            path = self._rollout_file(folder)
            if not _readable_safetensors(path):
                problems.append(
                    f"it was saved between two updates on one rollout (step {state.global_step}, "
                    f"`num_iterations={self.args.num_iterations}`) but {os.path.basename(path)}, the rollout they "
                    "share, is missing or unreadable"
                )
        return problems

    def _last_complete_checkpoint(self) -> str:
        output_dir = self.args.output_dir
        folders = []
        if os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                match = _CHECKPOINT_RE.fullmatch(name)
                if match and os.path.isdir(os.path.join(output_dir, name)):
                    folders.append((int(match.group(1)), os.path.join(output_dir, name)))
        skipped = []
        for _, folder in sorted(folders, reverse=True):
            problems = self.checkpoint_problems(folder)
            if not problems:
                if skipped:
                    logger.warning(
                        f"Resuming from {folder}; skipped the incomplete newer checkpoint(s) "
                        + "; ".join(f"{f} ({', '.join(p)})" for f, p in skipped)
                        + ". Delete them once this run has saved past them."
                    )
                return folder
            skipped.append((folder, problems))
        raise ValueError(
            f"`resume_from_checkpoint=True` but {output_dir} holds no complete checkpoint"
            + (": " + "; ".join(f"{f} ({', '.join(p)})" for f, p in skipped) if skipped else "")
            + ". Start without `resume_from_checkpoint`, or pass a checkpoint folder."
        )

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        config = {
            key: value
            for key, value in self.args.to_dict().items()
            if key in ARCOPO_CARD_FIELDS and isinstance(value, int | float | str | bool | list | type(None))
        }
        create_model_card(
            self.args.output_dir,
            base_model=self.pipeline.name_or_path or None,
            model_name=model_name or os.path.basename(self.args.output_dir.rstrip("/")),
            hub_model_id=self.args.hub_model_id,
            training_config=config,
            tags=tags,
            dataset_name=dataset_name,
            adapter_names=[self.adapter_name],
        )


ROLLOUT_NAME = "rollout"
#: The sample videos `log_completions` writes, uploaded by `push_to_hub(sample_videos=True)`.
SAMPLE_VIDEO_PATTERN = "completions/*.gif"
_CHECKPOINT_RE = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
_STALE_TEMPORARY_RE = re.compile(r"_tmp_lora_.*|_README\..*\.md\.tmp|.*\.(pt|safetensors)\.tmp-\d+")


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """
    Remove the temporary files and folders that a killed save left in `output_dir` and its checkpoint folders (every
    file is written under a temporary name, then renamed). Returns the removed paths.
    """
    folders = [output_dir] + [
        os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if _CHECKPOINT_RE.fullmatch(name) and os.path.isdir(os.path.join(output_dir, name))
    ]
    removed = []
    for folder in folders:
        for name in os.listdir(folder):
            if not _STALE_TEMPORARY_RE.fullmatch(name):
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    if removed:
        logger.info(f"Removed {len(removed)} temporary file(s) left by an interrupted save: {', '.join(removed)}.")
    return removed


def _readable_safetensors(path: str) -> bool:
    """Whether `path` is a complete safetensors file (the header is read and checked against the file size)."""
    try:
        with safe_open(path, framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False


def _nonfinite_fix(reason: str) -> str:
    if reason.startswith(("reward function", "the weighted sum")):
        return "Fix the reward function (return a finite float, or None for 'no opinion'), or rescale its values."
    if reason.startswith("the temperature"):
        return "Set `temperature` to a positive number, or None for the automatic choice."
    return (
        "The policy diverged: lower `learning_rate`, set `max_grad_norm`, and resume from the last checkpoint "
        "(`resume_from_checkpoint=True`)."
    )


class _NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps with a non-finite value (before) and refuses a non-finite adapter (after)."""

    def __init__(self, trainer: ARCoPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._skip_nonfinite_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_adapter_finite("after the optimizer step")


def check_trainable_peft_config(config: PeftConfig, adapter_name: str) -> None:
    """
    Refuse a PEFT config whose trainable parameters the trainer would not train or save: only LoRA (with DoRA and
    `modules_to_save`) is supported, without trainable biases or token indices.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"The adapter {adapter_name!r} is a {type(config).__name__}; ARCoPOTrainer trains LoRA adapters only "
            "(the reference policy is the transformer with the adapter disabled): pass a `peft.LoraConfig`."
        )
    if config.bias != "none":
        raise ValueError(
            f"`LoraConfig(bias={config.bias!r})` trains the base model's biases, which are shared with the reference "
            "policy and not saved with the adapter: use `bias='none'` (add the module to `modules_to_save` to train "
            "its own copy instead)."
        )
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(
            "`LoraConfig(trainable_token_indices=...)` trains text-embedding rows, which the video transformer does not "
            "have: remove it."
        )


def args_without_token(args: ARCoPOConfig) -> ARCoPOConfig:
    """A copy of `args` with `hub_token` cleared: what `training_args.bin` holds, so the file never carries it."""
    safe = copy.copy(args)
    safe.hub_token = None
    return safe


ARCOPO_CARD_FIELDS = (
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
