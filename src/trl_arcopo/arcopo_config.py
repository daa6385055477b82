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

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .loss import DISTANCE_REDUCTIONS, SCALE_REWARDS, check_aggregation, check_delta, get_loss_strategy
from .run_checks import SUB_BATCH_FIELDS, check_group_settings
from .sampling import check_sampler, check_sigmas


TRAINING_MODES = ("on_policy", "semi_on_policy")
#: Integer fields (a float, a bool or NaN is refused) and an example value for the error; `None` allowed for the second.
INTEGER_FIELDS = {
    "num_generations": 12, "num_anchors": 4, "num_iterations": 2, "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1, "max_steps": -1, "replay_buffer_size": 100, "max_nonfinite_steps": 3,
}  # fmt: skip
OPTIONAL_INTEGER_FIELDS = {
    "height": 480, "width": 832, "num_frames": 81, "num_frames_per_chunk": 3, "max_sequence_length": 512,
    "pivot_chunk": 0, "reward_num_workers": 4, "num_completions_to_print": 4, "reward_window_chunks": 2,
}  # fmt: skip


def check_integer(name: str, value, example: int, optional: bool = False) -> int | None:
    """
    `value` as an `int` (numpy integers included), refusing a float (NaN included), a bool or anything else with a
    `ValueError` naming the field, the value and an example; `None` passes where `optional`.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(  # noqa: TRY004 (a config error, as every other one)
            f"`{name}={value!r}` must be an integer{' or None' if optional else ''}, not a {type(value).__name__}: "
            f"set a whole number, e.g. `{name}={example}`."
        )
    return int(value)


@dataclass
class ARCoPOConfig(TrainingArguments):
    r"""
    Configuration class for [`ARCoPOTrainer`].

    Only the parameters specific to AR-CoPO are listed here; see [`~transformers.TrainingArguments`] for the rest.
    Paper values ([AR-CoPO](https://huggingface.co/papers/2603.17461)) are the defaults where the paper gives them.

    > [!NOTE]
    > Defaults that differ from [`~transformers.TrainingArguments`]: `learning_rate=1e-5` (paper),
    > `per_device_train_batch_size=1` (prompts, i.e. groups of `num_generations` videos, per device per rollout),
    > `logging_steps=1`, `ddp_find_unused_parameters=False`, `bf16=None` (True only on a GPU that supports it, so the defaults run on a CPU-only
    > machine), `activation_checkpointing` (`gradient_checkpointing`) uses diffusers' own checkpointing of the transformer, and
    > `remove_unused_columns=False` (extra dataset columns reach the reward functions).

    Parameters:
        > Parameters that control the model

        disable_dropout (`bool`, *optional*, defaults to `True`):
            Set every dropout in the transformer (LoRA dropout included) to 0, so that the rollout (in eval mode) and
            the update (in train mode) compute the same policy and the first ratio is exactly 1.

        > Parameters that control the videos

        height (`int` or `None`, *optional*, defaults to `None`):
            Video height in pixels. `None` uses the pipeline's `default_height`.
        width (`int` or `None`, *optional*, defaults to `None`):
            Video width in pixels. `None` uses the pipeline's `default_width`.
        num_frames (`int` or `None`, *optional*, defaults to `None`):
            Frames per video (with Wan's VAE `4k + 1`; with frame packing a multiple of its `scale_factor_temporal`).
            `None` uses the pipeline's `default_num_frames`.
        num_frames_per_chunk (`int` or `None`, *optional*, defaults to `None`):
            Latent frames per chunk (Self-Forcing: 3). `None` uses the pipeline's `default_num_frames_per_chunk`.
        denoising_sigmas (`list[float]` or `None`, *optional*, defaults to `None`):
            Per-chunk schedule before the scheduler's shift. `None` uses the pipeline's `default_sigmas`, else
            Self-Forcing's `[1.0, 0.75, 0.5, 0.25]` (with `shift=5`: timesteps `[1000, 937.5, 833.3, 625]`).
        sampler (`str` or `None`, *optional*, defaults to `None`):
            `"consistency"` (Self-Forcing's re-noise sampler) or `"ode"` (deterministic Euler). `None` uses the
            pipeline's `default_sampler`.
        max_sequence_length (`int` or `None`, *optional*, defaults to `None`):
            Text tokens; `None` uses the pipeline's `default_max_sequence_length`.

        > Parameters that control exploration (the forked group)

        num_generations (`int`, *optional*, defaults to `12`):
            Group size `G`: candidates forked at the pivot chunk of each prompt.
        num_anchors (`int`, *optional*, defaults to `4`):
            Anchors `B` per group and inner step (symmetric anchor sampling).
        fork_noise_scale (`float`, *optional*, defaults to `0.5`):
            `s` in `ε_p^(i) = sqrt(1 - s²)·ε_p + s·δ^(i)`.
        pivot_chunk (`int` or `None`, *optional*, defaults to `None`):
            Chunk where the group forks; `None` draws it uniformly from all chunks at every rollout.
        reward_window_chunks (`int` or `None`, *optional*, defaults to `None`):
            The rewards score only this many chunks from the pivot on (a long video's candidates differ from the
            pivot on; the reward then judges the change, not minutes of shared frames); `None`: the whole video.
            Reward functions get `frame_range=(start, stop)`, the video frames they see, and `pivot_chunk`.
        reward_context_chunks (`int`, *optional*, defaults to `0`):
            With `reward_window_chunks`, also show the rewards this many chunks before the pivot (shared by the
            group's candidates: context for the reward model).

        > Parameters that control the objective

        loss_type (`str`, *optional*, defaults to `"arcopo"`):
            - `"arcopo"`: clipped contrastive (Neighbor GRPO) objective on the pivot chunk's `x̂0` predictions.
            - `"sde_grpo"`: the Flow-GRPO / DanceGRPO baseline on the same sampler: the initial noise is shared, the
              candidates differ in the pivot chunk's re-noise, and the ratio uses the Gaussian log-probability of
              the re-noise transitions (needs `sampler="consistency"` and at least 2 steps).
            - any name registered with [`~trl_arcopo.loss.register_loss`] (a [`~trl_arcopo.loss.LossStrategy`]).
        num_iterations (`int`, *optional*, defaults to `2`):
            Inner updates per rollout (the paper's 2), each on freshly drawn anchors.
        epsilon (`float`, *optional*, defaults to `1e-4`):
            Ratio clip `ε` (paper: 1e-4).
        temperature (`float` or `None`, *optional*, defaults to `None`):
            `τ` of the surrogate policy `softmax(-d / τ)`. `None` sets it, for each group and denoising step, to the
            median distance between the stored predictions of different candidates, which makes the logits O(1)
            whatever the scale of the latents. The paper does not give `τ`.
        distance_reduction (`str`, *optional*, defaults to `"mean"`):
            How `d = ||x̂0_old - x̂0_θ||²` is reduced over elements: `"mean"` or `"sum"`.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage scaling: `"group"` (divide by the group's std), `"batch"` (by the batch's std) or `"none"`.
        quasi_norm_p (`float` or `None`, *optional*, defaults to `None`):
            If set (Neighbor GRPO uses 0.8), advantages are `c / (||c||_p / G^(1/p))` with `c = r - mean(r)`, which
            equals the std scaling for `p = 2` and favours groups whose signal sits in a few candidates for `p < 2`.
        beta (`float`, *optional*, defaults to `0.0`):
            Weight of a penalty `mean((x̂0_θ - x̂0_ref)²)` toward the reference policy (the adapter disabled) at
            the anchors: the KL between the two Gaussian re-noise policies up to a constant factor. `0` skips the
            reference forward.
        train_denoising_steps (`list[int]` or `None`, *optional*, defaults to `None`):
            Which denoising steps of the pivot chunk the update trains (indices into the schedule, `0` = the step
            from pure noise). `None` trains all the loss can (`sde_grpo`: all but the last, which has no transition). Each
            step left out saves one policy forward (and one reference forward with `beta > 0`) per inner update;
            the loss is the mean over the steps kept. Flow-GRPO and DanceGRPO train a fraction of the steps for the
            same reason.
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the reward functions; `None` weighs them equally (1.0).
        multi_objective_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            How several rewards become one, as in TRL: `"sum_then_normalize"` (the weighted sum, then the group
            advantage) or `"normalize_then_sum"` (each reward standardised within its group first, then the weighted
            sum and the group advantage: GDPO / DanceGRPO's per-reward advantages, which keep a reward with large
            values from drowning the others).
        async_rewards (`bool`, *optional*, defaults to `False`):
            Score in a thread pool: the reward functions run concurrently with each other, and with
            `gradient_accumulation_steps > num_iterations` the next rollout of the same optimizer step runs while
            the previous one is being scored. The policy is the same in both (it changes only at the optimizer
            step), so the result equals synchronous scoring for reward functions that do not share global state.
            Worth it for rewards that wait (a reward server, a judge) or run on another device.
        reward_num_workers (`int` or `None`, *optional*, defaults to `None`):
            Threads of the `async_rewards` pool; `None`: one per reward function plus one.

        > Parameters that control the training mode (on-policy or semi-on-policy)

        training_mode (`str`, *optional*, defaults to `"on_policy"`):
            - `"on_policy"`: every rollout is made by the current policy (exploration).
            - `"semi_on_policy"`: before training, `replay_buffer_size` groups are rolled out by the reference policy
              (the adapter disabled) with the same forking and rewards; every step then draws groups from this buffer
              with `π_old` = the reference, and the ratio clip is the trust region around it (exploitation). The
              current policy is never rolled out.
        replay_buffer_size (`int`, *optional*, defaults to `100`):
            Groups in the semi-on-policy replay buffer (paper: 100), split across processes.
        replay_buffer_path (`str` or `None`, *optional*, defaults to `None`):
            Load the buffer from this file if it exists, otherwise collect it and save it there. `None` saves it to
            `output_dir/replay_buffer.pt`. Checkpoints always carry a copy.
        replay_buffer_informative_only (`bool`, *optional*, defaults to `True`):
            Draw only buffer groups whose rewards differ. A group with equal rewards has zero advantages and gives
            no gradient, so drawing it only shrinks the batch. All groups stay in the buffer (and in its file).
        ratio_clip (`bool`, *optional*, defaults to `True`):
            Clip the ratio at `1 ± epsilon`. `False` is only for the off-policy ablation: without the clip nothing
            keeps the policy near the buffer's behaviour policy, and training is unsafe.
        delta (`float` or `None`, *optional*, defaults to `None`):
            Two-sided (dual) clip, as TRL's `delta`: the ratio is capped at `delta` in the unclipped term, so a
            negative-advantage term whose ratio ran far past `1 + epsilon` stops pushing with a gradient that grows with
            the ratio. Useful in semi-on-policy mode, where `π_old` (the reference) never moves and the policy can drift
            far from it on groups that are rarely drawn; e.g. `3`. Must exceed `1 + epsilon`.
        adapter_name (`str` or `None`, *optional*, defaults to `None`):
            Name of the trained LoRA adapter. `None`: the adapter already on the transformer if there is one and no
            `peft_config` is given, otherwise `"on_policy"` or `"semi"` according to `training_mode`, so that the two
            adapters can be loaded side by side and merged.

        > Parameters that control the moving average of the adapter

        ema_decay (`float` or `None`, *optional*, defaults to `None`):
            Keep an exponential moving average of the adapter, `ema ← decay · ema + (1 - decay) · θ` after every
            optimizer step, in float32 (e.g. `0.99`: about the last 100 steps). Checkpoints carry it
            (`adapter_ema.safetensors`), so a resumed run continues it exactly. `None`: off.
        use_ema_weights (`bool`, *optional*, defaults to `True`):
            With `ema_decay` set, evaluation and the saved model (`save_model`, `push_to_hub`) use the average
            instead of the last weights. Checkpoints always hold the last weights (to resume) next to the average.

        > Parameters that control memory (none of them changes what is computed)

        rollout_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Branches per transformer forward in the rollout: a group's `G` branches are rolled out in sequential
            sub-batches of at most this many branches of one prompt, all from the one prefix. The branches' KV cache
            and forward workspace shrink in proportion; the videos are the same bit for bit. `None`: every branch of
            every prompt of the process in one batch.
        anchor_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Anchors per forward and backward in the update: each denoising step's anchors are processed in
            sub-batches of at most this many anchors of every group, their gradients accumulated. The activations
            shrink in proportion; the gradient is the same up to the order of the float additions. `None`: all
            `num_anchors` at once.
        offload_text_encoder (`bool`, *optional*, defaults to `False`):
            Keep the text encoder off the accelerator: it is moved there only to encode prompts not seen before, and
            back to the CPU. Prompt embeddings are cached per prompt either way (each prompt is encoded once).
        decode_batch_size (`int` or `None`, *optional*, defaults to `1`):
            Videos per VAE decode call (as diffusers' `enable_vae_slicing`), so that the decoder's memory does not grow
            with `G`. `None`: every video of the rollout in one call.
        split_groups_across_processes (`bool`, *optional*, defaults to `False`):
            Split each group over the processes, as TRL's GRPO spreads a prompt's generations: every process gets
            the same prompts, builds the same prefix from the same seed, rolls out and scores its `G / n` branches
            (decoded and rewarded where they were made); the rewards, states and predictions are gathered, so the
            advantages are the whole group's, and each process updates on its `num_anchors / n` of the anchors. The
            videos and advantages equal one process's with the same `G`. For groups too large for one GPU (a 14B
            generator); needs `num_generations` and `num_anchors` divisible by the number of processes and on-policy
            training. `False`: each process its own prompts with whole groups (the faster layout where it fits).

        > Parameters that control failure handling

        max_nonfinite_steps (`int`, *optional*, defaults to `3`):
            An optimizer step whose rollout, rewards, advantages, temperature, loss or gradient holds a NaN or an
            infinity is skipped (the weights and the optimizer state are left as they were; the learning-rate schedule
            advances) and logged (`skipped_steps`, with a warning naming the quantity and the step). After this many
            consecutive skipped steps, training stops with an error naming the cause.

        > Parameters that control logging

        log_completions (`bool`, *optional*, defaults to `False`):
            Save a video grid of the first group of each rollout to `output_dir/completions/`, and every
            `logging_steps` show the last one: its candidates' videos and a table of prompt, candidate, pivot chunk,
            each reward and the advantage, in each tracker of `report_to` (tensorboard, wandb, trackio, mlflow) and on
            the console.
        num_completions_to_print (`int`, *optional*):
            Rows of that table printed on the console; `None`: all.
    """

    # Overridden TrainingArguments defaults
    learning_rate: float = field(default=1e-5, metadata={"help": "The initial learning rate for AdamW (paper: 1e-5)."})
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Prompts (groups of num_generations videos) per device per rollout."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X updates steps."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 mixed precision. None: only on a GPU that supports it (never on a CPU)."},
    )
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep extra dataset columns: they reach the reward functions."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP's unused-parameter search; every LoRA parameter is used, so off."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout of the transformer (LoRA dropout included) to 0, so that the rollout "
            "and the update compute the same policy."
        },
    )

    # Videos
    height: int | None = field(default=None, metadata={"help": "Video height; None uses the pipeline default."})
    width: int | None = field(default=None, metadata={"help": "Video width; None uses the pipeline default."})
    num_frames: int | None = field(
        default=None, metadata={"help": "Frames per video; None uses the pipeline default."}
    )
    num_frames_per_chunk: int | None = field(
        default=None,
        metadata={
            "help": "Latent frames per chunk (Self-Forcing: 3). None: the pipeline's default_num_frames_per_chunk."
        },
    )
    denoising_sigmas: list[float] | None = field(
        default=None,
        metadata={
            "help": "Per-chunk sigmas before the scheduler's shift; None: the pipeline's default (Self-Forcing's)."
        },
    )
    sampler: str | None = field(
        default=None, metadata={"help": "Chunk sampler: 'consistency' or 'ode'; None: the pipeline's default."}
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Text tokens; None uses the pipeline default."}
    )

    # Exploration
    num_generations: int = field(default=12, metadata={"help": "Group size G (paper: 12)."})
    num_anchors: int = field(default=4, metadata={"help": "Anchors per group and inner step (paper: 4)."})
    fork_noise_scale: float = field(default=0.5, metadata={"help": "Neighbour noise scale s (paper: 0.5)."})
    pivot_chunk: int | None = field(
        default=None, metadata={"help": "Chunk where groups fork; None draws it uniformly at every rollout."}
    )
    reward_window_chunks: int | None = field(
        default=None, metadata={"help": "Chunks from the pivot on that the rewards score; None: the whole video."}
    )
    reward_context_chunks: int = field(
        default=0, metadata={"help": "With reward_window_chunks: chunks before the pivot also shown to the rewards."}
    )

    # Objective
    loss_type: str = field(
        default="arcopo", metadata={"help": "'arcopo', the 'sde_grpo' baseline, or a registered loss."}
    )
    num_iterations: int = field(default=2, metadata={"help": "Inner updates per rollout (paper: 2)."})
    epsilon: float = field(default=1e-4, metadata={"help": "Ratio clip epsilon (paper: 1e-4)."})
    temperature: float | None = field(
        default=None,
        metadata={"help": "Surrogate temperature tau; None: median off-anchor distance of each group and step."},
    )
    distance_reduction: str = field(default="mean", metadata={"help": "Reduction of the distance: 'mean' or 'sum'."})
    scale_rewards: str = field(default="group", metadata={"help": "Advantage scaling: 'group', 'batch' or 'none'."})
    quasi_norm_p: float | None = field(
        default=None, metadata={"help": "Neighbor GRPO quasi-norm p for advantages (0.8 there); None: off."}
    )
    beta: float = field(default=0.0, metadata={"help": "Weight of the x0-space penalty toward the reference."})
    train_denoising_steps: list[int] | None = field(
        default=None, metadata={"help": "Denoising steps of the pivot chunk the update trains; None: all."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions; None: all 1.0."}
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "'sum_then_normalize' or 'normalize_then_sum' (each reward standardised per group first)."},
    )
    async_rewards: bool = field(
        default=False, metadata={"help": "Score in a thread pool, overlapping reward functions and the next rollout."}
    )
    reward_num_workers: int | None = field(
        default=None, metadata={"help": "Threads for async_rewards; None: one per reward function plus one."}
    )

    # Training mode
    training_mode: str = field(default="on_policy", metadata={"help": "'on_policy' or 'semi_on_policy'."})
    adapter_name: str | None = field(
        default=None, metadata={"help": "Name of the trained adapter; None: 'on_policy' or 'semi' by training_mode."}
    )
    replay_buffer_size: int = field(default=100, metadata={"help": "Groups in the replay buffer (paper: 100)."})
    replay_buffer_path: str | None = field(
        default=None, metadata={"help": "Load the buffer from this file if it exists, else collect and save it there."}
    )
    replay_buffer_informative_only: bool = field(
        default=True, metadata={"help": "Draw only buffer groups whose rewards differ (others give no gradient)."}
    )
    delta: float | None = field(
        default=None,
        metadata={"help": "Two-sided clip: cap the ratio at delta in the unclipped term (e.g. 3; None: off)."},
    )
    ratio_clip: bool = field(
        default=True, metadata={"help": "Clip the ratio at 1 +- epsilon; False is the unsafe off-policy ablation."}
    )

    # Moving average of the adapter
    ema_decay: float | None = field(default=None, metadata={"help": "Adapter EMA decay (e.g. 0.99); None: off."})
    use_ema_weights: bool = field(
        default=True, metadata={"help": "With ema_decay: evaluate and save the EMA weights instead of the last ones."}
    )

    # Memory
    rollout_batch_size: int | None = field(
        default=None, metadata={"help": "Branches per forward in the rollout (sub-batches); None: all at once."}
    )
    anchor_batch_size: int | None = field(
        default=None, metadata={"help": "Anchors per forward and backward in the update; None: all at once."}
    )
    offload_text_encoder: bool = field(
        default=False, metadata={"help": "Keep the text encoder on the CPU between the (cached) prompt encodings."}
    )
    decode_batch_size: int | None = field(
        default=1, metadata={"help": "Videos per VAE decode call; None: every video at once."}
    )
    split_groups_across_processes: bool = field(
        default=False,
        metadata={
            "help": "Split each group's G branches (and its anchors) over the processes; every process the same prompts."
        },
    )

    # Failure handling
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "Consecutive optimizer steps skipped for a non-finite reward, advantage, temperature, rollout, "
            "loss or gradient after which training stops with an error naming the cause."
        },
    )

    # Logging
    log_completions: bool = field(
        default=False,
        metadata={"help": "Save a video grid of each rollout's first group; log the last one to the trackers."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "Rows of the completions table printed on the console (None: all)."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()

        for fields, optional in ((INTEGER_FIELDS, False), (OPTIONAL_INTEGER_FIELDS, True)):
            for name, example in fields.items():
                setattr(self, name, check_integer(name, getattr(self, name), example, optional))
        if self.train_denoising_steps is not None:
            for j in self.train_denoising_steps:
                check_integer("train_denoising_steps", j, 0)
        check_group_settings(  # the rules the planner's settings obey too
            self.num_generations, self.num_anchors, self.num_iterations, self.per_device_train_batch_size, self.beta,
            self.train_denoising_steps, **{name: getattr(self, name) for name in SUB_BATCH_FIELDS},
        )  # fmt: skip
        if not 0 < self.fork_noise_scale <= 1:
            raise ValueError(f"`fork_noise_scale={self.fork_noise_scale}` must be in (0, 1] (paper: 0.5).")
        if self.sampler is not None:
            check_sampler(self.sampler)
        get_loss_strategy(self.loss_type).check(
            self.sampler, None if self.denoising_sigmas is None else len(self.denoising_sigmas)
        )  # again on the pipeline's schedule and sampler ([`~trl_arcopo.rollout.RolloutSpec.from_config`])
        if self.reward_window_chunks is not None and self.reward_window_chunks < 1:
            raise ValueError(
                f"`reward_window_chunks={self.reward_window_chunks}` must be at least 1 (the pivot chunk), or None "
                "to score the whole video."
            )
        self.reward_context_chunks = check_integer("reward_context_chunks", self.reward_context_chunks, 1)
        if self.reward_context_chunks < 0:
            raise ValueError(f"`reward_context_chunks={self.reward_context_chunks}` must be at least 0.")
        if self.reward_context_chunks and self.reward_window_chunks is None:
            raise ValueError(
                f"`reward_context_chunks={self.reward_context_chunks}` needs `reward_window_chunks`: without a window "
                "the rewards already see the whole video."
            )
        if self.num_completions_to_print is not None and self.num_completions_to_print < 0:
            raise ValueError(
                f"`num_completions_to_print={self.num_completions_to_print}` must be >= 0 rows, or None for all."
            )
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(
                f"`max_sequence_length={self.max_sequence_length}` must be a positive number of text tokens, or None "
                "for the pipeline's default."
            )
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}={value}` must be a positive size, or None for the pipeline's default.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"`gradient_accumulation_steps={self.gradient_accumulation_steps}` must be at least 1.")
        if self.max_steps == 0:
            raise ValueError("`max_steps=0` would still roll out and update: set it to at least 1, or -1 for epochs.")
        if not 0 < self.epsilon < math.inf:  # also refuses NaN
            raise ValueError(f"`epsilon={self.epsilon}` must be positive and finite (paper: 1e-4).")
        if not 0 <= self.learning_rate < math.inf:
            raise ValueError(f"`learning_rate={self.learning_rate}` must be non-negative and finite (paper: 1e-5).")
        if self.max_grad_norm is not None and not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(
                f"`max_grad_norm={self.max_grad_norm}` must be non-negative and finite (e.g. 1.0), or 0 / None for "
                "no clipping."
            )
        check_delta(self.delta, self.epsilon)
        if self.temperature is not None and not 0 < self.temperature < math.inf:
            raise ValueError(
                f"`temperature={self.temperature}` must be positive and finite, or None for the automatic choice."
            )
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"`reward_weights={list(self.reward_weights)}` must be finite numbers.")
        if self.distance_reduction not in DISTANCE_REDUCTIONS:
            raise ValueError(f"`distance_reduction={self.distance_reduction!r}` must be 'mean' or 'sum'.")
        check_aggregation(self.multi_objective_aggregation, "multi_objective_aggregation")
        if self.reward_num_workers is not None and self.reward_num_workers < 1:
            raise ValueError(f"`reward_num_workers={self.reward_num_workers}` must be at least 1 (or None).")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards={self.scale_rewards!r}` is not one of {SCALE_REWARDS}.")
        if self.quasi_norm_p is not None and not 0 < self.quasi_norm_p <= 2:
            raise ValueError(f"`quasi_norm_p={self.quasi_norm_p}` must be in (0, 2] (Neighbor GRPO: 0.8).")
        if self.num_frames_per_chunk is not None and self.num_frames_per_chunk < 1:
            raise ValueError(f"`num_frames_per_chunk={self.num_frames_per_chunk}` must be at least 1.")
        if self.pivot_chunk is not None and self.pivot_chunk < 0:
            raise ValueError(f"`pivot_chunk={self.pivot_chunk}` must be a chunk index (>= 0) or None (uniform).")
        if self.denoising_sigmas is not None:
            check_sigmas(self.denoising_sigmas, "denoising_sigmas")
        if self.split_groups_across_processes and self.training_mode != "on_policy":
            raise ValueError(
                "`split_groups_across_processes=True` splits on-policy rollouts; with "
                f"`training_mode={self.training_mode!r}` set it to False."
            )
        if self.training_mode not in TRAINING_MODES:
            raise ValueError(f"`training_mode={self.training_mode!r}` is not one of {TRAINING_MODES}.")
        if self.replay_buffer_size < 1:
            raise ValueError(f"`replay_buffer_size={self.replay_buffer_size}` must be at least 1 (paper: 100).")
        if not self.ratio_clip:
            warnings.warn(
                "`ratio_clip=False` removes the trust region: the policy can move arbitrarily far from the policy "
                "that produced the samples. Use it only for the off-policy ablation.",
                stacklevel=2,
            )
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay={self.ema_decay}` must be in [0, 1) (e.g. 0.99), or None to turn it off.")
        if self.max_nonfinite_steps < 1:
            raise ValueError(
                f"`max_nonfinite_steps={self.max_nonfinite_steps}` must be at least 1 (consecutive skipped steps "
                "tolerated before training stops)."
            )
        if self.auto_find_batch_size:
            raise ValueError("`auto_find_batch_size` is not supported: set `per_device_train_batch_size` (prompts).")
