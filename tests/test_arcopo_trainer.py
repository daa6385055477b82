import os
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import LORA, PROMPTS, ROOT, StopAt, load_script, redness, tiny_args, tiny_trainer
from huggingface_hub import ModelCard
from peft import LoraConfig

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, shapes
from trl_arcopo.rewards import load_reward_func
from trl_arcopo.rewards import redness as redness_reward
from trl_arcopo.testing_utils import tiny_pipeline


_args = tiny_args


def _trainer(tmp_path, pipe=None, reward_funcs=(redness,), dataset=None, **kwargs):
    return tiny_trainer(tmp_path, pipe=pipe, reward_funcs=reward_funcs, dataset=dataset, **kwargs)


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_generations=1), "num_generations=1.*at least 2"),
        (dict(num_generations=4, num_anchors=5), "num_anchors=5.*num_generations=4"),
        (dict(loss_type="dpo"), "loss_type"),
        (dict(loss_type="sde_grpo", sampler="ode"), "sde_grpo.*consistency"),
        (dict(denoising_sigmas=[0.5, 0.75]), "denoising_sigmas"),
        (dict(train_denoising_steps=[1, 1]), r"train_denoising_steps=\[1, 1\].*distinct"),
        (dict(train_denoising_steps=[]), r"train_denoising_steps=\[\]"),
        (dict(train_denoising_steps=[0, 1.5]), r"train_denoising_steps=1.5` must be an integer.*e.g."),
        # values that used to be replaced by defaults or accepted silently (NaN passes every `<` check)
        (dict(height=0), "height=0.*positive size"),
        (dict(width=-32), "width=-32.*positive size"),
        (dict(num_frames=0), "num_frames=0.*positive size"),
        (dict(height=480.5), r"height=480.5` must be an integer or None, not a float: .*e.g. `height=480`"),
        (dict(num_frames_per_chunk=NAN), "num_frames_per_chunk=nan` must be an integer or None"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size=0.*at least 1"),
        (dict(per_device_train_batch_size=1.5), "per_device_train_batch_size=1.5` must be an integer, not a float"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0.*at least 1"),
        (dict(max_steps=0), "max_steps=0.*at least 1"),
        (dict(max_steps=2.5), "max_steps=2.5` must be an integer"),
        (dict(epsilon=NAN), "epsilon=nan.*positive"),
        (dict(epsilon=INF), "epsilon=inf.*positive and finite"),
        (dict(temperature=NAN), "temperature=nan.*positive and finite"),
        (dict(beta=NAN), "beta=nan.*non-negative and finite"),
        (dict(reward_weights=[1.0, NAN]), r"reward_weights=\[1.0, nan\].*finite"),
        (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation='mean'.*not one of"),
        (dict(reward_num_workers=0), "reward_num_workers=0.*at least 1"),
        (dict(reward_num_workers=2.0), "reward_num_workers=2.0` must be an integer or None"),
        (dict(rollout_batch_size=0), "rollout_batch_size=0.*positive integer or None"),
        (dict(anchor_batch_size=2.5), "anchor_batch_size=2.5.*positive integer or None"),
        (dict(decode_batch_size=-1), "decode_batch_size=-1.*positive integer or None"),
        (dict(ema_decay=1.0), r"ema_decay=1.0.*\[0, 1\)"),
        (dict(ema_decay=NAN), r"ema_decay=nan.*\[0, 1\)"),
        (dict(learning_rate=NAN), "learning_rate=nan.*non-negative and finite"),
        (dict(max_grad_norm=NAN), "max_grad_norm=nan.*non-negative and finite"),
        (dict(fork_noise_scale=NAN), r"fork_noise_scale=nan.*\(0, 1\]"),
        (dict(quasi_norm_p=NAN), r"quasi_norm_p=nan.*\(0, 2\]"),
        # non-finite and non-integer values of the fields that count something
        (dict(delta=NAN), r"delta=nan` must exceed 1 \+ epsilon .* and be finite \(e.g. 3\), or be None"),
        (dict(delta=INF), r"delta=inf` must exceed 1 \+ epsilon .* and be finite"),
        (dict(delta=1.0), r"delta=1.0` must exceed 1 \+ epsilon"),
        (dict(max_nonfinite_steps=NAN), r"max_nonfinite_steps=nan` must be an integer, not a float: .*e.g. `max_nonf"),
        (dict(max_nonfinite_steps=0), "max_nonfinite_steps=0` must be at least 1"),
        (dict(num_generations=2.5), r"num_generations=2.5` must be an integer, not a float: .*`num_generations=12`"),
        (dict(num_generations=True), "num_generations=True` must be an integer, not a bool"),
        (dict(num_iterations=1.5), r"num_iterations=1.5` must be an integer, not a float: .*`num_iterations=2`"),
        (dict(num_iterations=NAN), "num_iterations=nan` must be an integer, not a float"),
        (dict(num_iterations=True), "num_iterations=True` must be an integer, not a bool"),
        (dict(num_iterations=0), "num_iterations=0` must be at least 1"),
        (dict(num_anchors=2.0), "num_anchors=2.0` must be an integer"),
        (dict(replay_buffer_size=NAN), "replay_buffer_size=nan` must be an integer"),
        (dict(pivot_chunk=1.0), "pivot_chunk=1.0` must be an integer or None"),
        (dict(pivot_chunk=-1), r"pivot_chunk=-1` must be a chunk index \(>= 0\)"),
        (dict(max_sequence_length=-5), "max_sequence_length=-5` must be a positive number of text tokens, or None"),
        (dict(max_sequence_length=0), "max_sequence_length=0` must be a positive number of text tokens, or None"),
        (dict(max_sequence_length=64.0), "max_sequence_length=64.0` must be an integer or None, not a float"),
        (dict(num_completions_to_print=-1), r"num_completions_to_print=-1` must be >= 0 rows, or None for all"),
    ],
)
def test_config_errors_name_value_and_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ARCoPOConfig("out", use_cpu=True, **kwargs)


def test_config_defaults_and_valid_values():
    config = ARCoPOConfig("out")  # the defaults run on a machine without a GPU
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert config.gradient_checkpointing is False and config.remove_unused_columns is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated TrainingArguments field is set by the defaults
        ARCoPOConfig("out", use_cpu=True)
    # integers of other types (numpy's, from a sweep) are taken as ints; valid values are kept as given
    config = ARCoPOConfig(
        "out", use_cpu=True, num_generations=np.int64(6), max_sequence_length=64, delta=3.0, max_nonfinite_steps=1,
        pivot_chunk=0, max_grad_norm=None,
    )  # fmt: skip
    assert type(config.num_generations) is int and config.num_generations == 6
    assert (config.max_sequence_length, config.delta, config.max_nonfinite_steps, config.pivot_chunk) == (
        64,
        3.0,
        1,
        0,
    )


def test_trainer_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        _trainer(tmp_path, dataset=Dataset.from_dict({"text": PROMPTS}))
    with pytest.raises(ValueError, match="no rows"):
        _trainer(tmp_path, dataset=Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match="'prompt' column of `train_dataset` holds Value\\('int64'\\).*one string"):
        _trainer(tmp_path, dataset=Dataset.from_dict({"prompt": [1, 2, 3, 4]}))
    with pytest.raises(ValueError, match="`reward_weights` has 2 values but there are 1 reward functions"):
        _trainer(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="has 4 prompts but one step takes 8"):
        _trainer(tmp_path, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match="pivot_chunk=3"):
        _trainer(tmp_path, pivot_chunk=3)
    with pytest.raises(ValueError, match="use e.g. `num_frames=9`"):
        _trainer(tmp_path, num_frames=8)
    with pytest.raises(ValueError, match=r"train_denoising_steps=\[0, 3\]` but the schedule has 3 steps.*\[0, 3\)"):
        _trainer(tmp_path, train_denoising_steps=[0, 3])
    with pytest.raises(ValueError, match="sde_grpo` cannot train the last one: use indices in \\[0, 2\\)"):
        _trainer(tmp_path, train_denoising_steps=[2], loss_type="sde_grpo", sampler="consistency")


@pytest.mark.parametrize(
    ("reward", "match"),
    [
        (lambda prompts, videos, **kw: [0.0] * (len(prompts) - 1), "`bad` returned 2 values for 3 videos"),
        (
            lambda prompts, videos, **kw: [0.0, "0.5", 1.0],
            r"`bad` returned \"'0.5'\" \(str\) for video 1: return a float or None \(prompt",
        ),
    ],
)
def test_bad_rewards_name_the_function_and_prompt(tmp_path, reward, match):
    reward.__name__ = "bad"
    trainer = _trainer(tmp_path, reward_funcs=[reward], per_device_train_batch_size=1)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_constant_rewards_give_zero_advantages_and_no_update(tmp_path):
    def constant(prompts, videos, **kwargs):
        return [0.5] * len(prompts)

    trainer = _trainer(tmp_path, reward_funcs=[constant])
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.train()
    assert _history(trainer, "frac_reward_zero_std")[0] == 1.0
    assert _history(trainer, "advantages/abs_mean")[0] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in _history(trainer, "loss"))
    assert all(torch.equal(before[k], v) for k, v in trainer.adapter_state_dict().items())


def test_none_rewards_and_extra_columns(tmp_path):
    seen = {}

    def picky(prompts, videos, category, trainer_state, **kwargs):
        seen["category"] = category
        return [None if i == 0 else float(i) for i in range(len(prompts))]

    dataset = Dataset.from_dict({"prompt": PROMPTS, "category": ["a", "b", "c", "d"]})
    trainer = _trainer(tmp_path, reward_funcs=[picky, redness], dataset=dataset, max_steps=1)
    trainer.train()
    assert len(seen["category"]) == 2 * 3 and seen["category"][0] == seen["category"][2]
    assert torch.isfinite(torch.tensor(_history(trainer, "reward")[0]))


def test_first_inner_step_ratio_is_exactly_one(tmp_path):
    """Acceptance: in a real batched step (2 groups of G = 3), the first update has ratio == 1, clip_fraction == 0."""
    trainer = _trainer(tmp_path, max_steps=4, num_iterations=2)
    trainer.train()
    assert _history(trainer, "first_step/ratio/min") == [1.0, 1.0]
    assert _history(trainer, "first_step/ratio/max") == [1.0, 1.0]
    assert _history(trainer, "first_step/clip_fraction") == [0.0, 0.0]
    # the second inner step sees the updated policy: the ratio moves and the clip engages
    ratio_max = _history(trainer, "ratio/max")
    assert ratio_max[1] > 1.0 and _history(trainer, "clip_fraction")[1] > 0


def test_training_changes_lora_only_and_grads_stay_in_pivot_chunk(tmp_path):
    pipe = tiny_pipeline()
    base_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    trainer = _trainer(tmp_path, pipe=pipe, max_steps=4, pivot_chunk=1)
    lora_before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    assert lora_before

    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("kv_cache")
        calls.append(
            dict(
                grad=torch.is_grad_enabled(),
                offset=kwargs.get("frame_offset"),
                commit=kwargs.get("update_cache"),
                batch=args[0].shape[0],
                input_grad=args[0].requires_grad,
                cache_grad=cache is not None and any(k.requires_grad for k in cache.keys),
            )
        )

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    handle.remove()

    for name, value in trainer.adapter_state_dict().items():
        assert not torch.equal(value, lora_before[name]), f"{name} did not change"
    for name, value in pipe.transformer.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name.replace(".base_layer", "")]), f"{name} changed"
    grad_calls = [c for c in calls if c["grad"]]
    # every forward with autograd is the pivot chunk (frames 3..5), never a commit, reading a detached cache
    assert grad_calls and all(c["offset"] == 3 and not c["commit"] and not c["cache_grad"] for c in grad_calls)
    assert not any(c["input_grad"] for c in grad_calls)
    # per update: one batched call per denoising step on N x K = 2 x 2 anchor chunks
    assert len(grad_calls) == 4 * 3 and all(c["batch"] == 4 for c in grad_calls)


def test_train_denoising_steps_all_equals_default_and_a_subset_trains_only_those(tmp_path):
    default = _trainer(tmp_path / "default", max_steps=2)
    default.train()
    listed = _trainer(tmp_path / "listed", max_steps=2, train_denoising_steps=[2, 0, 1])
    listed.train()
    for name, value in default.adapter_state_dict().items():
        assert torch.equal(value, listed.adapter_state_dict()[name]), name
    assert _history(default, "loss") == _history(listed, "loss")

    pipe = tiny_pipeline()
    subset = _trainer(tmp_path / "subset", pipe=pipe, max_steps=2, train_denoising_steps=[1])
    timesteps = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            timesteps.append(kwargs.get("timestep", args[1] if len(args) > 1 else None))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    subset.train()
    handle.remove()
    # one rollout, 2 inner updates, each one forward with autograd: at step 1 of the schedule only
    assert len(timesteps) == 2
    for t in timesteps:
        assert torch.allclose(torch.as_tensor(t).float().flatten(), subset.spec.timesteps[1].float())
    assert not torch.equal(
        torch.cat([v.flatten() for v in subset.adapter_state_dict().values()]),
        torch.cat([v.flatten() for v in default.adapter_state_dict().values()]),
    )


def test_frame_packed_pipeline_trains_on_one_latent_frame_per_chunk(tmp_path):
    """`num_frames_per_chunk=None` takes the pipeline's default: with frame packing, one latent frame (3 frames)."""
    pipe = tiny_pipeline(pack_frames=True)
    shapes = []

    def record_shape(prompts, videos, **kwargs):
        shapes.append(tuple(videos.shape))
        return redness(prompts, videos)

    trainer = _trainer(tmp_path, pipe=pipe, reward_funcs=(record_shape,), max_steps=2, pivot_chunk=1)
    assert trainer.args.num_frames_per_chunk == 1 and trainer.spec.num_chunks == 3
    lora_before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    offsets = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: offsets.append(kwargs.get("frame_offset")) if torch.is_grad_enabled() else None,
        with_kwargs=True,
    )
    trainer.train()
    handle.remove()
    assert shapes and all(shape[1:] == (9, 3, 16, 16) for shape in shapes)  # decoded: 9 frames of 16x16
    assert offsets and set(offsets) == {1}  # the pivot chunk is latent frame 1 (frames 3..5)
    assert all(not torch.equal(v, lora_before[k]) for k, v in trainer.adapter_state_dict().items())


def test_same_seed_same_run_whatever_the_global_rng(tmp_path):
    """The LoRA init draws from the global RNG: two launches with one `seed` must train the same adapter."""

    def lora_state(trainer):
        return {k: v.clone() for k, v in trainer.adapter_state_dict().items()}

    states = []
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)  # whatever ran before the trainer in this process
        trainer = _trainer(tmp_path / f"run{i}")
        initial = lora_state(trainer)
        trainer.train()
        states.append((initial, lora_state(trainer)))
    (init_a, final_a), (init_b, final_b) = states
    assert init_a.keys() == init_b.keys() and len(init_a) > 0
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert any(not torch.equal(init_a[k], final_a[k]) for k in final_a)  # and training did move it
    torch.manual_seed(1)
    other = lora_state(_trainer(tmp_path / "other", seed=1))
    assert any(not torch.equal(init_a[k], other[k]) for k in init_a)  # another seed, another init


def test_resume_equals_uninterrupted(tmp_path):
    straight = _trainer(tmp_path / "a", max_steps=4, num_iterations=2)
    straight.train()
    # the same run (same schedule, max_steps=4) interrupted right after its checkpoint at step 2
    first = _trainer(tmp_path / "b", max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2)
    first.add_callback(StopAt(2))
    first.train()
    assert first.state.global_step == 2
    resumed = _trainer(tmp_path / "b", max_steps=4, num_iterations=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    expected = straight.adapter_state_dict()
    got = resumed.adapter_state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert os.path.exists(tmp_path / "b" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert os.path.exists(tmp_path / "b" / "README.md")  # the model card, written at each checkpoint


def test_saved_adapter_reproduces_outputs_and_card(tmp_path):
    pipe = tiny_pipeline()
    pipe.register_to_config(_name_or_path="trl-arcopo/tiny-self-forcing")
    trainer = _trainer(tmp_path / "run", pipe=pipe, max_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    assert (out / "pytorch_lora_weights.safetensors").exists()

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = pipe("a red fox jumps", generator=generator(), output_type="pt").frames
    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(out))
    assert torch.equal(fresh("a red fox jumps", generator=generator(), output_type="pt").frames, expected)

    trainer.create_model_card(dataset_name="trl-arcopo/prompts")
    card = ModelCard.load(out / "README.md")
    for tag in ("trl", "arcopo", "diffusers", "lora", "text-to-video"):
        assert tag in card.data.tags
    assert card.data.base_model == "trl-arcopo/tiny-self-forcing"
    assert "load_lora_weights" in card.text and "2603.17461" in card.text

    # what a push uploads: the adapter and the card, nothing else of output_dir
    from huggingface_hub.utils import filter_repo_objects

    for name in ("replay_buffer.pt", "completions/step_000001.gif", "runs/events.out", "checkpoint-1/optimizer.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    trainer.args.hub_token = "hf_not_a_real_token"
    with (
        mock.patch("transformers.trainer.hf_api") as transformers_api,
        mock.patch("trl_arcopo.hub.HfApi") as api,
    ):
        transformers_api.return_value.create_repo.return_value = mock.Mock(repo_id="user/tiny-arcopo")
        trainer.args.hub_model_id = "user/tiny-arcopo"
        trainer.push_to_hub(dataset_name="trl-arcopo/prompts")
        kwargs = api.return_value.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "user/tiny-arcopo" and kwargs["token"] == "hf_not_a_real_token"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    uploaded = sorted(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
    assert uploaded == ["README.md", "pytorch_lora_weights.safetensors"]
    # and, when asked, the sample videos
    (out / "completions" / "step_000001.txt").write_text("a prompt")
    with mock.patch("trl_arcopo.hub.HfApi") as api:
        trainer.push_to_hub(sample_videos=True)
        kwargs = api.return_value.upload_folder.call_args.kwargs
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    uploaded = sorted(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"]))
    assert uploaded == ["README.md", "completions/step_000001.gif", "pytorch_lora_weights.safetensors"]
    assert "training_args.bin" in files  # written, kept local, and without the token:
    saved = torch.load(out / "training_args.bin", weights_only=False)  # the trainer's own file
    assert saved.hub_token is None and trainer.args.hub_token == "hf_not_a_real_token"
    # pushes during training (`hub_strategy="every_save"`) upload the same two files, the checkpoint's adapter first
    checkpoint = out / "checkpoint-2"
    trainer._save(str(checkpoint))
    (out / "pytorch_lora_weights.safetensors").unlink()
    trainer.args.hub_strategy, trainer.push_in_progress = "every_save", None
    with mock.patch("trl_arcopo.hub.HfApi") as api:
        trainer._push_from_checkpoint(str(checkpoint))
        kwargs = api.return_value.upload_folder.call_args.kwargs
    assert kwargs["allow_patterns"] == ["pytorch_lora_weights.safetensors", "README.md"]
    assert kwargs["folder_path"] == trainer.args.output_dir and kwargs["run_as_future"] is True
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == (
        checkpoint / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def test_sde_grpo_baseline_runs_with_exact_first_ratio(tmp_path):
    trainer = _trainer(tmp_path, loss_type="sde_grpo", max_steps=2)
    trainer.train()
    assert _history(trainer, "first_step/ratio/min") == [1.0]
    assert _history(trainer, "first_step/ratio/max") == [1.0]


def test_two_process_ddp_example_keeps_adapters_identical(tmp_path):
    """Acceptance: the example under a 2-process CPU DDP launch finishes and both ranks hold the same adapter."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src"))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        os.path.join(ROOT, "examples", "train_arcopo.py"), "--pipeline_name_or_path", "tiny-random",
        "--output_dir", str(tmp_path), "--max_steps", "2", "--per_device_train_batch_size", "1",
        "--num_generations", "3", "--num_anchors", "2", "--lora_r", "4", "--lora_alpha", "8",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu",
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical on all 2 process(es)" in result.stderr + result.stdout
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_evaluation_and_sample_videos(tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = ARCoPOTrainer(
        pipeline=tiny_pipeline(),
        reward_funcs=[redness],
        args=_args(tmp_path, max_steps=2, log_completions=True, per_device_eval_batch_size=2),
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    gifs = sorted(p for p in os.listdir(tmp_path / "completions") if p.endswith(".gif"))
    assert gifs == ["step_000000.gif"]  # one grid per rollout: G branches side by side
    trainer.evaluate()
    logged = trainer.state.log_history[-1]  # evaluation metrics are logged (report_to), as in TRL's GRPO
    assert "eval_reward" in logged and "eval_rewards/redness/mean" in logged and "eval_loss" in logged


def _example_module():
    """`examples/train_arcopo.py` imported as a module (it is a script, not part of the package)."""
    return load_script(os.path.join(ROOT, "examples", "train_arcopo.py"))


def test_example_parses_yaml_config(tmp_path):
    from trl import TrlParser

    module = _example_module()
    parser = TrlParser((module.ScriptArguments, ARCoPOConfig, module.LoraArguments))
    config = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
    script_args, training_args, lora_args = parser.parse_args_and_config(
        args=["--config", config, "--output_dir", str(tmp_path), "--num_generations", "6", "--use_cpu"]
    )
    assert training_args.num_generations == 6  # the command line overrides the file
    assert training_args.num_anchors == 2 and training_args.max_steps == 8 and lora_args.lora_r == 8
    assert script_args.pipeline_name_or_path == "tiny-random" and script_args.reward_funcs is None
    # the main job's file: the shipped Moving Shapes model (a fresh parser: a config sets parser defaults)
    parser = TrlParser((module.ScriptArguments, ARCoPOConfig, module.LoraArguments))
    script_args, training_args, _ = parser.parse_args_and_config(
        args=["--config", os.path.join(ROOT, "examples", "configs", "moving_shapes.yaml"), "--use_cpu"]
    )
    assert script_args.pipeline_name_or_path == "moving-shapes" and training_args.max_steps > 0
    # it trains the preference next to the verifiable rewards, one weight each, every name resolvable
    assert script_args.reward_funcs[0] == "prominence_reward"
    assert len(training_args.reward_weights) == len(script_args.reward_funcs) == 5
    assert [load_reward_func(n).__name__ for n in script_args.reward_funcs] == script_args.reward_funcs
    # the shape-binding job keeps the four verifiable rewards alone
    parser = TrlParser((module.ScriptArguments, ARCoPOConfig, module.LoraArguments))
    script_args, training_args, _ = parser.parse_args_and_config(
        args=["--config", os.path.join(ROOT, "examples", "configs", "moving_shapes_binding.yaml"), "--use_cpu"]
    )
    assert script_args.reward_funcs == shapes.VERIFIABLE_REWARDS and training_args.beta == 0.0


def test_example_reads_the_main_job_file_unless_told_otherwise():
    """`train_arcopo.py --seed 1` is the main job with another seed, not the library's defaults."""
    from trl import TrlParser

    module = _example_module()
    default = ["--config", module.DEFAULT_CONFIG]
    assert module.with_default_config([]) == default
    assert module.with_default_config(["--seed", "1"]) == ["--seed", "1", *default]
    assert module.with_default_config(["--pipeline_name_or_path=moving-shapes"])[-2:] == default
    for argv in (["--config", "x.yaml"], ["--config=x.yaml"], ["--pipeline_name_or_path", "tiny-random"]):
        assert module.with_default_config(argv) == argv
    parser = TrlParser((module.ScriptArguments, ARCoPOConfig, module.LoraArguments))
    script_args, training_args, lora_args = parser.parse_args_and_config(
        args=module.with_default_config(["--seed", "1", "--use_cpu"])
    )
    assert training_args.seed == 1 and training_args.max_steps == 40 and training_args.beta == 5.0
    assert script_args.reward_funcs[0] == "prominence_reward" and lora_args.lora_r == 16


def test_example_uses_every_core_when_alone_on_cpu():
    """`accelerate launch` pins OMP_NUM_THREADS=1; the example takes the cores back only where that is safe."""
    cpu_threads = _example_module().cpu_threads
    assert cpu_threads(None, 1, "cpu", 2) == 2  # one process on a CPU machine: every core
    assert cpu_threads(None, 2, "cpu", 2) is None  # several processes share the cores: keep accelerate's split
    assert cpu_threads(None, 1, "cuda", 8) is None  # the GPU does the work
    assert cpu_threads(3, 1, "cuda", 8) == 3  # an explicit request always wins
    with pytest.raises(ValueError, match="--num_threads must be at least 1, got 0"):
        cpu_threads(0, 1, "cpu", 2)


def test_beta_penalty_is_zero_at_init_and_grows(tmp_path):
    """With beta > 0 the reference is the transformer with the adapter disabled: equal to the policy at init."""
    trainer = _trainer(tmp_path, beta=0.1, max_steps=4)
    trainer.train()
    kl = _history(trainer, "kl")
    assert kl[0] == 0.0  # LoRA B = 0 at init: policy == reference exactly
    assert kl[-1] > 0.0
    # the adapter is enabled again after every reference pass: the policy still differs from the reference
    from trl_arcopo.policy import reference_policy

    transformer = trainer.pipeline.transformer.eval()
    x, text, t = torch.randn(1, 3, 3, 16, 16), torch.randn(1, 4, 32), torch.tensor([500.0])
    with torch.no_grad():
        policy = transformer(x, t, text).sample
        with reference_policy(transformer):
            reference = transformer(x, t, text).sample
        again = transformer(x, t, text).sample
    assert not torch.allclose(policy, reference) and torch.equal(policy, again)


def test_main_job_report_files_and_paired_difference(tmp_path):

    def result(by_seed):  # an `evaluate_generator` result with two seed sets
        t = torch.tensor(by_seed)
        entry = {"mean": t.mean().item(), "std": t.std().item(), "by_seed": by_seed, "within_prompt_std": 0.1}
        return dict.fromkeys(shapes.REPORT_KEYS, entry)

    before = {"train": result([0.30, 0.34]), "heldout": result([0.30, 0.32])}
    after = {"train": result([0.35, 0.37]), "heldout": result([0.40, 0.45])}
    after["heldout"] = {**after["heldout"], "all_correct": result([0.50, 0.42])["all_correct"]}
    after["heldout"]["prominence"] = result([0.62, 0.66])["prominence"]
    videos = torch.rand(12, 12, 3, 32, 32)
    log = [{"step": s, "reward": 1.0 + s, "rewards/colour_reward/mean": 0.5} for s in (1, 2, 3)]
    table = shapes.write_report(str(tmp_path), (before, videos), (after, videos), log, ["colour_reward"])
    for name in ("eval_results.json", "eval_table.md", "samples.gif", "reward_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    header = "| | prominence | colour_acc | shape_acc | direction_acc | all_correct | temporal_quality | combined |"
    assert table.count(header) == 2  # one table per split, the preference first
    # held-out: trained − base per seed set, its mean ± std, the base's spread (0.014) and the ratio to it
    assert "| Preference (prominence) | +0.320, +0.340 | +0.330 ± 0.014 | 0.014 | +23.3× |" in table
    assert "| All-correct rate | +0.200, +0.100 | +0.150 ± 0.071 | 0.014 | +10.6× |" in table
    assert "| Temporal quality | +0.100, +0.130 | +0.115 ± 0.021 | 0.014 | +8.1× |" in table
    assert table.count("within-prompt std over seeds 0.100") == 2


def test_random_control_reward_ignores_the_videos(tmp_path):
    control = load_reward_func("random")
    prompts = ["a red square moving left"] * 5
    torch.manual_seed(3)
    first = control(prompts, torch.zeros(5, 12, 3, 32, 32))
    torch.manual_seed(3)
    second = control(prompts, torch.ones(5, 12, 3, 32, 32))  # other videos, same generator state: same scores
    assert first == second and len(first) == 5 and all(0 <= r <= 1 for r in first) and len(set(first)) == 5
    assert load_reward_func("redness") is redness_reward
    assert load_reward_func("shape_reward") is shapes.shape_reward
    assert load_reward_func("trl_arcopo.shapes.prominence_reward") is shapes.prominence_reward
    with pytest.raises(ValueError, match="'random'"):
        load_reward_func("no_such_reward")
