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
"""`ARCoPOTrainer`: wires rollouts, rewards, the loss and the replay buffer into `transformers.Trainer`."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from peft import PeftConfig
from transformers import ProgressCallback, Trainer, TrainerCallback, set_seed
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging

from .arcopo_config import ARCoPOConfig
from .checkpointing import CheckpointMixin, between_iterations, is_checkpoint_folder
from .completions import Completions, log_to_trackers
from .data import EpochRepeatSampler, check_datasets, seeded_generator
from .ema import AdapterEMA
from .generator import StreamingGenerator, check_generator
from .hub import ARCOPO_BIBTEX, ARCOPO_PAPER, HubMixin, save_sample_gif
from .loss import LossStats, get_loss_strategy, x0_penalty
from .nonfinite import NonFiniteGuard
from .policy import add_policy_adapter, check_adapters_in_sync, prepare_for_training, reference_policy
from .prompt_cache import PromptEmbeddingCache
from .replay_buffer import ReplayBuffer, ReplaySource
from .rewards import RewardFunc, RewardScorer
from .rewards.base import unscored_groups
from .rewards.frames import quantize_8bit
from .rollout import RolloutSpec, reward_chunk_range, sample_group
from .rollout_group import AnchorBatch, RolloutGroup
from .split_groups import check_split_groups, gather_group, process_share
from .tracker_callbacks import use_diffusers_tracker_callbacks


logger = logging.get_logger(__name__)

_OWNERS = {"train": "policy", "eval": "eval", "collect": "reference"}
_ROLLOUT, _ANCHORS, _EVAL, _BUFFER_DRAW, _COLLECT = 1, 2, 3, 4, 5  # purposes of the seeded generators


class ARCoPOTrainer(HubMixin, CheckpointMixin, Trainer):
    r"""
    Trainer for AR-CoPO ([AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy
    Optimization](https://huggingface.co/papers/2603.17461)): on-policy alignment of a streaming autoregressive video
    generator with sequence-level rewards.

    Each rollout forks every prompt's generation at one chunk into `num_generations` candidates that differ only in
    that chunk's initial noise ([`~trl_arcopo.rollout.sample_group`]), scores the videos
    ([`~trl_arcopo.rewards.score_group`]) and runs `num_iterations` updates of a clipped contrastive objective on that
    chunk alone ([`~trl_arcopo.loss.arcopo_loss`]). The policy is a LoRA adapter on `pipeline.transformer`; the
    reference is the transformer with it disabled. A loss variant overrides [`~ARCoPOTrainer._compute_loss`].

    Args:
        pipeline ([`~trl_arcopo.generator.StreamingGenerator`]): the streaming generator, e.g. a [`SelfForcingPipeline`].
        reward_funcs (`RewardFunc` or `list[RewardFunc]`): `fn(prompts, videos, **kwargs) -> list[float | None]`.
        args ([`ARCoPOConfig`], *optional*): defaults to `ARCoPOConfig("arcopo-output")`.
        train_dataset ([`~datasets.Dataset`]): needs a `"prompt"` column; other columns reach the rewards.
        eval_dataset ([`~datasets.Dataset`], *optional*): evaluated by rolling out groups and logging their rewards.
        peft_config ([`~peft.LoraConfig`], *optional*): the adapter to train; without it, an adapter already on the
            transformer, or a default LoRA (r=64, alpha=128, attention and FFN projections).
        callbacks, optimizers: as in [`~transformers.Trainer`].

    Example:

    ```py
    >>> trainer = ARCoPOTrainer(pipeline=pipe, reward_funcs=[my_reward], args=ARCoPOConfig("out"), train_dataset=ds)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "arcopo"]
    _name = "AR-CoPO"
    _paper = {**ARCOPO_PAPER, "citation": ARCOPO_BIBTEX}

    def __init__(
        self,
        pipeline: StreamingGenerator,
        reward_funcs: RewardFunc | list[RewardFunc],
        args: ARCoPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: PeftConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
    ):
        args = args if args is not None else ARCoPOConfig("arcopo-output")
        check_generator(pipeline)  # every member the rollout and the update use, named if missing
        self.scorer = RewardScorer(
            reward_funcs, args.reward_weights, args.multi_objective_aggregation, args.async_rewards,
            args.reward_num_workers,
        )  # fmt: skip
        self.reward_funcs, self.reward_func_names = self.scorer.funcs, self.scorer.names  # as TRL's GRPOTrainer
        processes = 1 if args.split_groups_across_processes else args.world_size  # split: one step's prompts
        check_datasets(train_dataset, eval_dataset, args.per_device_train_batch_size, processes, args.training_mode)
        self.pipeline, self.spec = pipeline, RolloutSpec.from_config(pipeline, args)  # checked before any rollout
        self.loss_strategy = get_loss_strategy(args.loss_type)  # the loss and what it needs ([`~trl_arcopo.loss`])
        args.num_frames_per_chunk = self.spec.num_frames_per_chunk

        # The policy. LoRA's A matrices come from the global RNG, which `Trainer.__init__` seeds only later: seed it
        # here, so that the same `seed` gives the same adapter (and run) in every launch.
        set_seed(args.seed)
        default_name = "semi" if args.training_mode == "semi_on_policy" else "on_policy"
        self.adapter_name = add_policy_adapter(pipeline.transformer, peft_config, args.adapter_name, default_name)
        checkpointing = bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing)
        prepare_for_training(pipeline.transformer, args.disable_dropout, checkpointing)
        args.activation_checkpointing = args.gradient_checkpointing = False  # Trainer's own is transformers-only
        for module in (pipeline.text_encoder, pipeline.vae):
            if module is not None:
                module.requires_grad_(False).eval()

        super().__init__(
            model=pipeline.transformer,
            args=args,
            data_collator=lambda features: features,  # rows stay a list of dicts, like TRL's GRPO
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.offload_text_encoder:  # everything but the text encoder (the prompt cache moves it when needed)
            for module in pipeline.components.values():
                if isinstance(module, torch.nn.Module) and module is not pipeline.text_encoder:
                    module.to(self.accelerator.device)
        else:
            pipeline.to(self.accelerator.device)
        #: Prompt embeddings, each prompt encoded once ([`~trl_arcopo.prompt_cache.PromptEmbeddingCache`]).
        self.prompt_embeddings = PromptEmbeddingCache(
            pipeline, args.max_sequence_length, self.accelerator.device, args.offload_text_encoder
        )
        self.scorer.to(self.accelerator.device)  # reward models follow the accelerator, unless quantised
        if args.split_groups_across_processes:
            check_split_groups(args.num_generations, args.num_anchors, self.accelerator.num_processes)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list), "collect": defaultdict(list)}
        self._step = 0  # micro-steps done
        self._buffered_rollout: RolloutGroup | None = None
        self._window, self._window_position, self._prefetched = [], 0, {}  # async_rewards: the next rollout
        self._resume_checkpoint: str | None = None
        #: Groups of `num_generations` videos rolled out, by who made them: the policy being trained (`"policy"`),
        #: the reference for the replay buffer (`"reference"`), the policy during evaluation (`"eval"`).
        self.rollout_counts = {"policy": 0, "reference": 0, "eval": 0}
        #: Semi-on-policy: the replay buffer of this process and its file (`None` on-policy).
        self.replay = ReplaySource.from_args(
            args, self.spec, self.accelerator.process_index, self.accelerator.num_processes
        )
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.current_gradient_accumulation_steps = 1  # `train()` sets it per optimizer step
        use_diffusers_tracker_callbacks(self)  # transformers' TensorBoard and MLflow callbacks, for a diffusers config
        #: `log_completions`: the last group rolled out, shown at the next log; the GIFs given to trackers by path.
        self._completions: Completions | None = None
        self._completions_folder: str | None = None
        self._guard = NonFiniteGuard(args.max_nonfinite_steps, self.accelerator, self.adapter_state_dict)
        self.add_callback(self._guard)
        #: The moving average of the adapter (`ema_decay`), else `None`.
        self.ema = AdapterEMA(self._adapter_parameters(), args.ema_decay) if args.ema_decay is not None else None
        if self.ema is not None:
            self.add_callback(self.ema)

    def train(self, *args, **kwargs):
        """
        As [`~transformers.Trainer.train`] (with the checkpoint checks of the checkpoint mixin). The reward threads of
        `async_rewards` are closed when training ends or fails: scores not started are cancelled, and a reward still
        running does not hold the process at exit.
        """
        try:
            return super().train(*args, **kwargs)
        finally:
            self.scorer.close(wait=False)
            for callback in self.callback_handler.callbacks:  # a failed run's progress bar, closed before the error
                if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                    callback.training_bar.close()
                    callback.training_bar = None
            if self._completions_folder is not None:  # the GIFs the trackers took by path (they copy them)
                shutil.rmtree(self._completions_folder, ignore_errors=True)
                self._completions_folder = None

    def _share(self, size: int) -> slice:
        """This process's share of `size` items split over the processes (`split_groups_across_processes`)."""
        return process_share(size, self.accelerator.process_index, self.accelerator.num_processes)

    @property
    def skipped_steps(self) -> list[dict[str, Any]]:
        """Every optimizer step skipped for a non-finite value in this process: `{"step": int, "reason": str}`."""
        return self._guard.skipped_steps

    # ------------------------------------------------------------------ data and randomness
    # Private `Trainer` methods overridden here, as TRL's GRPOTrainer overrides them, each because no public hook
    # serves: the dataset's columns (`remove_unused_columns` reads the model's forward signature otherwise), the
    # sampler (a `DataLoader` is built inside `get_train_dataloader`), and the batch becoming a rollout
    # (`_prepare_inputs` is the one place between the dataloader and `training_step`).
    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt"]

    def _get_train_sampler(self, train_dataset=None):
        # split groups: every process gets the same prompts (each chunk of them once per process and iteration)
        split = self.args.split_groups_across_processes
        processes = self.accelerator.num_processes
        return EpochRepeatSampler(
            data_source=train_dataset if train_dataset is not None else self.train_dataset,
            mini_repeat_count=1,
            batch_size=self.args.per_device_train_batch_size * (1 if split else processes),
            repeat_count=self.args.num_iterations * (processes if split else 1),
            shuffle=True,
            seed=self.args.seed,
        )

    def _rng(self, purpose: int, device: torch.device | str | None = None, step: int | None = None) -> torch.Generator:
        """
        Keyed on the micro-step: exact after a resume, different for the micro-steps of one optimizer step; and on the
        process, except for a split group's rollout and anchors, which every process draws alike.
        """
        device = self.accelerator.device if device is None else device
        step = self._step if step is None else step
        shared = self.args.split_groups_across_processes and purpose in (_ROLLOUT, _ANCHORS)
        rank = 0 if shared else self.accelerator.process_index
        return seeded_generator(self.args.seed, step, rank, purpose, device)

    # ------------------------------------------------------------------ rollout and rewards
    def generate_and_score(
        self, inputs: list[dict[str, Any]], mode: str = "train", generator: torch.Generator | None = None
    ) -> RolloutGroup:
        """
        Roll out one forked group per prompt of `inputs` (dataset rows) and score it. `mode` is `"train"` or `"eval"`
        (the current policy) or `"collect"` (the caller has disabled the adapter: reference rollouts for the replay
        buffer). `generator` defaults to the run's seeded one for this step. With [`accumulate_gradients`], the
        building blocks of a custom loop or an analysis.
        """
        return self._start_rollout(inputs, mode, generator)()

    def sample_rollouts(
        self,
        prompts: list[str],
        prompt_embeds: torch.Tensor,
        generator: torch.Generator,
        branches: slice | None = None,
    ) -> RolloutGroup:
        """
        One forked group per prompt, not yet scored ([`~trl_arcopo.rollout.sample_group`] with the run's settings):
        every rollout of the trainer goes through this method, so a subclass changes the exploration here. `branches`:
        this process's share of each group's candidates when groups are split over processes (`None`: all).
        """
        args = self.args
        return sample_group(
            self.pipeline, self.spec, prompts, prompt_embeds, args.num_generations, generator, args.pivot_chunk,
            self.loss_strategy.exploration, args.fork_noise_scale, args.rollout_batch_size, branches,
        )  # fmt: skip

    @torch.no_grad()
    def _start_rollout(self, inputs: list[dict[str, Any]], mode: str, generator: torch.Generator | None = None):
        """Roll out and start scoring ([`~trl_arcopo.rewards.RewardScorer`]); returns what finishes the group."""
        args = self.args
        prompts = [row["prompt"] for row in inputs]
        if generator is None:
            generator = self._rng(_ROLLOUT) if mode == "train" else self._rng(_EVAL, step=self.state.global_step)
        self.rollout_counts[_OWNERS[mode]] += len(prompts)
        start = time.perf_counter()
        embeds = self.prompt_embeddings(prompts)  # [N, S, text_dim]
        transformer = self.accelerator.unwrap_model(self.model)
        was_training = transformer.training
        transformer.eval()
        split = args.split_groups_across_processes and mode == "train"
        branches = self._share(args.num_generations) if split else None  # this process's share of every group
        group = self.sample_rollouts(prompts, embeds, generator, branches)
        transformer.train(was_training)
        first, stop = reward_chunk_range(
            group.pivot, self.spec.num_chunks, args.reward_window_chunks, args.reward_context_chunks
        )
        frames = self.spec.num_frames_per_chunk
        frame_range = getattr(self.pipeline, "pixel_frame_range", lambda a, b: (a, b))(first * frames, stop * frames)
        latents = group.latents.flatten(0, 1)  # [N * G, C, F, H, W]
        if args.reward_window_chunks is None:
            videos = self.pipeline.decode_latents(latents, output_type="pt", batch_size=args.decode_batch_size)
        else:  # each part decoded whole (a causal VAE's frames depend on those before), then cut to the window
            step = args.decode_batch_size or latents.shape[0]
            videos = torch.cat([
                self.pipeline.decode_latents(part, output_type="pt", batch_size=step)[:, frame_range[0] : frame_range[1]]
                for part in latents.split(step)
            ])  # fmt: skip
        # videos: [N * G, F', C, H, W], the frames the rewards see
        rollout_seconds = time.perf_counter() - start
        finite = bool(torch.isfinite(group.latents).all())  # rewards are not asked to judge non-finite videos
        rewards = self.scorer.start(
            inputs, videos if finite else None, group.num_generations, trainer_state=self.state,
            frame_range=frame_range, pivot_chunk=group.pivot,
        )  # fmt: skip
        return partial(self._finish_group, group, rewards, videos, mode, rollout_seconds, finite)

    def _finish_group(self, group: RolloutGroup, rewards, videos, mode: str, rollout_seconds: float, finite: bool):
        args, rewards = self.args, rewards()
        nonfinite = rewards.nonfinite if finite else f"the rollout's latents are not finite (pivot {group.pivot})"
        local = slice(0, group.num_generations)  # the candidates whose videos this process holds
        if args.split_groups_across_processes and mode == "train":
            local = self._share(args.num_generations)
            group, rewards = gather_group(self.accelerator, group, rewards, nonfinite, self.scorer, args)
            nonfinite = rewards.nonfinite
        nonfinite = nonfinite or unscored_groups(rewards.per_func, group.num_generations, self.scorer.funcs)
        self._with_rewards(group, rewards.combined.to(self.accelerator.device), nonfinite)
        if group.nonfinite is not None and mode == "collect":
            raise ValueError(f"A reference rollout for the replay buffer cannot be used: {group.nonfinite}.")
        if group.nonfinite is not None:
            logger.warning(f"Rollout at step {self.state.global_step} ({mode}): {group.nonfinite}.")
        metrics = {**group.metrics(), **rewards.metrics(self.scorer.names), **self.scorer.failure_metrics()}
        metrics["timing/rollout_seconds"] = rollout_seconds
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if args.log_completions and self.accelerator.is_main_process and mode == "train":
            folder, name = os.path.join(args.output_dir, "completions"), f"step_{self.state.global_step:06d}"
            save_sample_gif(
                folder, name, group.prompts[0], videos[: local.stop - local.start], group.rewards[0, local]
            )
            first = rewards.per_func[: group.num_generations][local]  # [G_local, n_funcs]: the first group's
            self._completions = Completions(
                step=self.state.global_step,
                prompt=group.prompts[0],
                pivot=group.pivot,
                videos=quantize_8bit(videos[: local.stop - local.start]).to(torch.uint8).cpu(),
                rewards={name: first[:, i].tolist() for i, name in enumerate(self.scorer.names)},
                reward=group.rewards[0, local].tolist(),
                advantages=group.advantages[0, local].tolist(),
            )  # logged with the next metrics ([`log`])
        if mode != "collect":
            group.latents = None  # only the replay buffer keeps them (the prefix)
        return group

    @property
    def replay_buffer(self) -> ReplayBuffer | None:
        """The semi-on-policy replay buffer of this process (`None` on-policy)."""
        return self.replay.buffer if self.replay is not None else None

    # ------------------------------------------------------------------ semi-on-policy: the replay buffer
    def _ensure_replay_buffer(self) -> None:
        """Fill the replay buffer once: from `replay_buffer_path` if it exists, else by reference rollouts."""
        args = self.args
        with reference_policy(self.accelerator.unwrap_model(self.model)):
            stats = self.replay.ensure(
                # independent of the step: re-collecting after a crash gives the same buffer
                lambda rows, i: self.generate_and_score(rows, "collect", self._rng(_COLLECT + i, step=0)),
                self.train_dataset, args.per_device_train_batch_size, args.seed, args.replay_buffer_informative_only,
                self.is_local_process_zero(),
            )  # fmt: skip
        collect = self._metrics["collect"]
        for key in ("reward", "reward_std") if stats is not None and collect.get("reward") else ():
            self._metrics["train"][f"buffer/{key}"].append(sum(collect[key]) / len(collect[key]))
        collect.clear()
        for key, value in (stats or {}).items():
            self._metrics["train"][key].append(value)

    def _sample_from_buffer(self) -> list[RolloutGroup]:
        """`per_device_train_batch_size` distinct buffer groups, batched by pivot chunk (prefixes by the reference)."""
        args, generator = self.args, self._rng(_BUFFER_DRAW, device="cpu")
        with reference_policy(self.accelerator.unwrap_model(self.model)):
            groups = self.replay.draw(
                self.pipeline, args.per_device_train_batch_size, generator, args.replay_buffer_informative_only,
            )  # fmt: skip
        return [self._with_rewards(g, g.rewards.double()) for g in groups]

    def _with_rewards(self, group: RolloutGroup, rewards: torch.Tensor, nonfinite: str | None = None) -> RolloutGroup:
        """The whole `group` scored: the loss's temperature, then `rewards` and their advantages."""
        group = self._with_temperature(group)
        return group.with_rewards(rewards, self.args.scale_rewards, self.args.quasi_norm_p, nonfinite)

    def _with_temperature(self, group: RolloutGroup) -> RolloutGroup:
        """Set the loss's temperature `[N, T]` of `group` from its old predictions, once (before any update)."""
        if group.temperature is None:
            group.temperature = self.loss_strategy.temperature(group.x0_preds, self.args)
        return group

    # ------------------------------------------------------------------ training step
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window, self._window_position = batch_samples, 0  # the rows of this optimizer step's micro-steps
        return batch_samples, num_items

    def _prepare_inputs(self, inputs: list[dict[str, Any]]) -> RolloutGroup:
        step, iterations = self._step, self.args.num_iterations
        if step % iterations == 0 or self._buffered_rollout is None:
            finish = self._prefetched.pop(step, None) or self._start_rollout(inputs, "train")
            later = self._window_position + iterations  # the next rollout, if this optimizer step has one
            if self.args.async_rewards and self.args.training_mode == "on_policy" and later < len(self._window):
                # same policy (it changes at the optimizer step): roll it out while this one is being scored
                rng = self._rng(_ROLLOUT, step=step + iterations)
                self._prefetched[step + iterations] = self._start_rollout(self._window[later], "train", rng)
            self._buffered_rollout = finish()
        return self._buffered_rollout

    def training_step(self, model: torch.nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        args = self.args
        if self._step == 0 and self.state.global_step > 0:  # resumed: continue the micro-step count
            self._step = self.state.global_step * args.gradient_accumulation_steps
            if between_iterations(self._step, args.num_iterations, args.training_mode):  # it carries the rollout
                path = self._rollout_file(self._resume_checkpoint)
                self._buffered_rollout = RolloutGroup.load(path, device=self.accelerator.device)
        model.train()
        if args.training_mode == "semi_on_policy":
            # exploitation: groups of the reference policy from the buffer; the current policy is never rolled out
            self._ensure_replay_buffer()
            groups, iteration = self._sample_from_buffer(), None
        else:
            groups, iteration = [self._prepare_inputs(inputs)], self._step % args.num_iterations
        for group in groups:
            if group.nonfinite is not None:
                self._guard.flag(group.nonfinite)
        start, total = time.perf_counter(), sum(len(g.prompts) for g in groups)
        loss = sum(
            self._update(model, g, iteration, weight=len(g.prompts) / total, final=i == len(groups) - 1)
            for i, g in enumerate(groups)
        )
        self._metrics["train"]["timing/update_seconds"].append(time.perf_counter() - start)
        self._step, self._window_position = self._step + 1, self._window_position + 1
        return torch.full_like(loss, math.nan) if self._guard.pending else loss  # a skipped step has no loss

    def _update(self, model, group: RolloutGroup, iteration: int | None, weight: float = 1.0, final: bool = True):
        """
        The localised update on the pivot chunk: `K` anchors per group (fresh each inner iteration), then for each
        trained denoising step [`compute_loss`] and one backward. The loss is scaled by `weight` (the share of these
        groups in the step); gradients are synchronised after the `final` backward. Returns the detached total loss.
        """
        args, metrics = self.args, self._metrics["train"]
        anchors = AnchorBatch.draw(group, args.num_anchors, self._rng(_ANCHORS), iteration)
        if args.split_groups_across_processes and iteration is not None:  # this process's share of the anchors
            anchors = anchors.sub_batches(args.num_anchors // self.accelerator.num_processes)[
                self.accelerator.process_index
            ]  # the gradients' mean over processes is the mean over every anchor
        steps = self.spec.trained_steps(args.train_denoising_steps, group.pivot, self.loss_strategy)
        scale = weight / len(steps) / self.current_gradient_accumulation_steps
        total = torch.zeros((), device=group.states.device)
        self._loss_stats, self._penalties = [], []
        sub_batches = anchors.sub_batches(args.anchor_batch_size)  # one forward and backward each (memory)
        for position, j in enumerate(steps):
            for i, sub in enumerate(sub_batches):
                last = final and position == len(steps) - 1 and i == len(sub_batches) - 1
                share = scale * sub.num_anchors / anchors.num_anchors  # the loss is a mean over anchors
                with nullcontext() if last else self.accelerator.no_sync(model):
                    loss = self.compute_loss(model, replace(sub, step=j))
                    if not torch.isfinite(loss):
                        self._guard.flag(f"the loss is {loss.item()} at denoising step {j} (pivot {group.pivot})")
                    self.accelerator.backward(loss * share)  # even then: every process runs the same collectives
                total += loss.detach() * share
        for key, value in LossStats.reduce(self._loss_stats).items():
            metrics[key].append(value)
            if iteration == 0:
                metrics[f"first_step/{key}"].append(value)
        if self._penalties:
            metrics["kl"].append(sum(self._penalties) / len(self._penalties))
        return total

    def accumulate_gradients(self, group: RolloutGroup, iteration: int | None = 0) -> torch.Tensor:
        """
        One update's backward on `group` into the adapter's `.grad` (no optimizer step): the first inner update by
        default, `None` as for replay-buffer groups. Returns the detached loss.
        """
        self.model.train()
        self._with_temperature(group)  # a group made outside the trainer's rollout has no temperature yet
        return self._update(self.model, group, iteration)

    def compute_loss(self, model, inputs: AnchorBatch, return_outputs=False, num_items_in_batch=None) -> torch.Tensor:
        """
        One denoising step of the update: the policy's `x̂0` at the anchors (and the reference's where `beta > 0` or
        for replay-buffer groups, whose `π_old` it is), then [`_compute_loss`].
        """
        group, j, n = inputs.group, inputs.step, inputs.anchor_index.shape[0]

        def predict(transformer=None):  # [N * K, C, Fc, H, W]
            return self.pipeline.predict_x0(
                inputs.x_t, group.timesteps[j], group.sigmas[j].item(), inputs.prompt_embeds, inputs.prefix_cache,
                group.frame_offset, transformer=transformer,
            )  # fmt: skip

        x0_old, x0_ref = group.x0_preds[:, :, j], None  # [N, G, C, Fc, H, W] (a view)
        if inputs.iteration is None or self.args.beta > 0:
            with torch.no_grad(), reference_policy(self.accelerator.unwrap_model(model)):
                x0_ref = predict()
        if inputs.iteration is None:  # semi-on-policy: π_old is the reference, at the anchors recomputed right here
            x0_old = x0_old.clone()
            x0_old.flatten(0, 1)[inputs.rows] = x0_ref.to(x0_old.dtype)
        x0_theta = predict(transformer=model)
        if inputs.iteration == 0:
            # θ == θ_old: refresh the anchors' stored predictions with this exact computation, so that the first
            # ratio is exactly 1 whatever the batching of the rollout was (x0_old sees it: a view)
            group.x0_preds[:, :, j].flatten(0, 1)[inputs.rows] = x0_theta.detach().to(group.x0_preds.dtype)
        x0_ref = x0_ref.unflatten(0, (n, -1)) if x0_ref is not None else None
        return self._compute_loss(inputs, x0_theta.unflatten(0, (n, -1)), x0_old, x0_ref)

    def _compute_loss(self, inputs: AnchorBatch, x0_theta, x0_old, x0_ref) -> torch.Tensor:
        """
        The objective at one denoising step: `x0_theta` `[N, K, *]` (the policy at the anchors, with gradient),
        `x0_old` `[N, G, *]` (every candidate's old prediction), `x0_ref` `[N, K, *]` (the reference; `None` unless
        `beta > 0` or replay-buffer groups): the registered loss of `loss_type` ([`~trl_arcopo.loss.register_loss`],
        the way to add one), plus the `beta` penalty. Its [`LossStats`] are logged.
        """
        args = self.args
        loss, stats = self.loss_strategy.loss(inputs, x0_theta, x0_old, args)  # `loss_type`'s ([`LossStrategy`])
        self._loss_stats.append(stats)
        if args.beta > 0:
            penalty = x0_penalty(x0_theta, x0_ref)
            self._penalties.append(penalty.item())
            loss = loss + args.beta * penalty
        return loss

    def _adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        transformer = self.accelerator.unwrap_model(self.model)
        return {n: p for n, p in transformer.named_parameters() if f".{self.adapter_name}." in n}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained adapter's parameters (PEFT names), detached."""
        return {n: p.detach() for n, p in self._adapter_parameters().items()}

    def ema_weights(self, folder: str | None = None):
        """
        A context in which the adapter holds its moving average (`ema_decay` and `use_ema_weights`), else a no-op; a
        no-op too for a save into a checkpoint `folder` ([`~trl_arcopo.checkpointing.is_checkpoint_folder`]): a
        checkpoint holds the last weights, which a resume continues from.
        """
        checkpoint = folder is not None and is_checkpoint_folder(folder)
        use = self.ema is not None and self.args.use_ema_weights and not checkpoint
        return self.ema.swapped() if use else nullcontext()

    def check_adapters_in_sync(self) -> bool:
        """Check that every process holds the same adapter ([`~trl_arcopo.policy.check_adapters_in_sync`])."""
        return check_adapters_in_sync(self.accelerator, self.adapter_state_dict())

    # ------------------------------------------------------------------ evaluation and logging
    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        with self.ema_weights():
            return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.generate_and_score(inputs, mode="eval")
        return torch.zeros((), device=self.accelerator.device), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._metrics[mode].items():
            values = [v for v in values if not math.isnan(v)]  # NaN: no opinion in this window
            if values:
                metrics[key] = sum(values) / len(values)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        else:
            metrics["skipped_steps"] = float(len(self.skipped_steps))
            window, self._guard.window = self._guard.window, []
            if window and min(window) == 1.0 and "loss" in logs:  # every step of the window was skipped: no loss
                logs = {**logs, "loss": math.nan}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self._completions is not None:
            completions, self._completions = self._completions, None
            completions.print(self.args.num_completions_to_print)
            if self._completions_folder is None:
                self._completions_folder = tempfile.mkdtemp(prefix="trl_arcopo_completions_")
            writer = next(
                (c.tb_writer for c in self.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None
            )
            log_to_trackers(completions, self.args.report_to, self._completions_folder, writer)
