"""
Fault injection: non-finite values, interrupted runs, broken checkpoints, crafted files and PEFT configs. Each case
asserts what the user gets: the step skipped and named, the resumed run equal to the uninterrupted one, the broken
file skipped or refused, nothing but finite weights on disk.
"""

import glob
import json
import logging
import os
import stat

import pytest
import torch
from helpers import LORA, PROMPTS, redness, tiny_trainer
from peft import LoHaConfig, LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_arcopo.lora_files import load_lora_adapter_weights
from trl_arcopo.testing_utils import tiny_pipeline


def _trainer(output_dir, reward_funcs=(redness,), peft_config=None, **kwargs):
    return tiny_trainer(output_dir, reward_funcs=reward_funcs, peft_config=peft_config, **{"max_steps": 4, **kwargs})


class RecordAdapter(TrainerCallback):
    """The adapter after every optimizer step: `states[s]` is the adapter after step `s` (`states[0]`: initial)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.states = [self._copy()]

    def _copy(self):
        return {k: v.clone() for k, v in self.trainer.adapter_state_dict().items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(self._copy())


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved_tensors(folder):
    """Every tensor in every safetensors and torch file under `folder` (loaded without unpickling code)."""
    tensors = {}
    for path in glob.glob(os.path.join(folder, "**", "*.safetensors"), recursive=True):
        tensors.update({f"{path}:{k}": v for k, v in load_file(path).items()})
    for path in glob.glob(os.path.join(folder, "**", "optimizer.pt"), recursive=True):
        for i, param_state in torch.load(path, weights_only=True)["state"].items():
            tensors.update({f"{path}:{i}:{k}": v for k, v in param_state.items() if torch.is_tensor(v)})
    return tensors


# ---------------------------------------------------------------- non-finite values: skip, log, stop
def test_a_nan_reward_skips_that_step_only(tmp_path, caplog):
    def flaky(prompts, videos, trainer_state, **kwargs):
        values = redness(prompts, videos)
        if trainer_state.global_step == 1:  # the rollout of optimizer step 2
            values[1] = float("nan")
        return values

    trainer = _trainer(tmp_path, reward_funcs=[flaky], num_iterations=1)
    record = RecordAdapter(trainer)
    trainer.add_callback(record)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo"):
        trainer.train()
    states = record.states
    assert len(states) == 5
    assert _equal(states[1], states[2])  # step 2 left the weights as they were
    assert not _equal(states[0], states[1]) and not _equal(states[2], states[3])  # the others trained
    assert [s["step"] for s in trainer.skipped_steps] == [2]
    assert "reward function `flaky` returned nan for video 1 of prompt 'a" in trainer.skipped_steps[0]["reason"]
    assert "Skipped optimizer step 2: reward function `flaky` returned nan" in caplog.text
    # the optimizer state did not take the step either: 3 AdamW steps for 4 optimizer steps
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {3}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["skipped_steps"] for h in logs] == [0.0, 1.0, 1.0, 1.0]
    assert torch.tensor(logs[1]["loss"]).isnan() and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs[2:])


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("reward", r"reward function `nan_after_one_step` returned nan .*Fix the reward function"),
        ("temperature", r"the temperature is not a positive finite number \(got nan\).*Set `temperature`"),
        ("learning_rate", r"the rollout's latents are not finite.*The policy diverged: lower `learning_rate`"),
    ],
)
def test_repeated_nonfinite_steps_stop_training_and_nothing_nonfinite_is_saved(tmp_path, fault, match):
    def nan_after_one_step(prompts, videos, trainer_state, **kwargs):
        values = redness(prompts, videos)
        return values if trainer_state.global_step == 0 else [float("nan")] * len(values)

    kwargs = dict(max_steps=8, save_strategy="steps", save_steps=1, num_iterations=1, max_nonfinite_steps=2)
    if fault == "reward":
        trainer = _trainer(tmp_path, reward_funcs=[nan_after_one_step], **kwargs)
    elif fault == "learning_rate":
        trainer = _trainer(tmp_path, learning_rate=1e6, **kwargs)
    else:
        trainer = _trainer(tmp_path, **kwargs)
        trainer.args.temperature = float("nan")  # past the config's validation, as a corrupted value would be
    with pytest.raises(RuntimeError, match=f"2 consecutive optimizer steps .*{match}"):
        trainer.train()
    assert len(trainer.skipped_steps) == 2
    assert trainer.state.global_step < 8
    saved = _saved_tensors(str(tmp_path))
    assert len(glob.glob(str(tmp_path / "checkpoint-*"))) >= 1 and saved
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.isfinite(v).all() for v in trainer.adapter_state_dict().values())


def test_reward_sums_are_float64_and_an_overflow_is_blamed_on_the_sum(tmp_path):
    def huge(prompts, videos, **kwargs):  # finite in float32, but two of them overflow a float32 sum
        return [3e38 * (1 + 0.1 * r) for r in redness(prompts, videos)]

    trainer = _trainer(tmp_path, reward_funcs=[huge, huge], max_steps=2)
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.train()
    assert trainer.skipped_steps == []
    assert not _equal(before, trainer.adapter_state_dict())

    def enormous(prompts, videos, **kwargs):  # overflows even a float64 sum
        return [1.7e308] * len(prompts)

    trainer = _trainer(tmp_path / "b", reward_funcs=[enormous, enormous], max_steps=2, max_nonfinite_steps=2)
    with pytest.raises(RuntimeError, match=r"weighted sum of the rewards overflowed .*enormous=1.7e\+308"):
        trainer.train()


# ---------------------------------------------------------------- resume from every step
@pytest.mark.parametrize("training_mode", ["on_policy", "semi_on_policy"])
def test_resume_from_every_step_equals_the_uninterrupted_run(tmp_path, training_mode):
    kwargs = dict(num_iterations=2, training_mode=training_mode, replay_buffer_size=4)
    straight = _trainer(tmp_path / "straight", **kwargs)
    straight.train()
    expected = straight.adapter_state_dict()

    saving = _trainer(tmp_path / "saving", save_strategy="steps", save_steps=1, **kwargs)
    saving.train()
    assert _equal(expected, saving.adapter_state_dict())  # saving does not perturb the run
    rollout_files = sorted(
        os.path.basename(os.path.dirname(p)) for p in glob.glob(str(tmp_path / "saving/*/rollout*"))
    )
    # a checkpoint between the two updates on one rollout carries that rollout (on-policy only)
    assert rollout_files == (["checkpoint-1", "checkpoint-3"] if training_mode == "on_policy" else [])
    for step in (1, 2, 3):
        resumed = _trainer(tmp_path / f"resumed-{step}", **kwargs)
        resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / f"checkpoint-{step}"))
        assert resumed.state.global_step == 4
        assert _equal(expected, resumed.adapter_state_dict()), f"resumed at step {step}"
        # no extra rollout: after a resume between two updates, the buffered one is used
        if training_mode == "on_policy":
            assert resumed.rollout_counts["policy"] == {1: 2, 2: 2, 3: 0}[step]  # groups rolled out after resuming


def test_a_checkpoint_between_updates_without_its_rollout_is_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, num_iterations=2, save_strategy="steps", save_steps=1)
    trainer.train()
    os.remove(tmp_path / "checkpoint-1" / "rollout.safetensors")
    resumed = _trainer(tmp_path, max_steps=2, num_iterations=2)
    with pytest.raises(ValueError, match=r"checkpoint-1: it was saved between two updates on one rollout .*missing"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ---------------------------------------------------------------- checkpoint recovery
def test_an_incomplete_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    straight = _trainer(tmp_path / "straight", max_steps=4, num_iterations=1)
    straight.train()

    out = tmp_path / "run"
    first = _trainer(out, max_steps=4, num_iterations=1, save_strategy="steps", save_steps=1)
    first.train()
    # what a kill during saves leaves: a cut trainer_state.json, a truncated adapter, temporary files
    state = out / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    adapter = out / "checkpoint-3" / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-50])
    (out / "checkpoint-3" / "pytorch_lora_weights.safetensors.tmp-77").write_bytes(b"partial")
    (out / "README.md.tmp-9").write_text("partial")
    (out / "replay_buffer.pt.tmp-123").write_bytes(b"partial")

    resumed = _trainer(out, max_steps=4, num_iterations=1, save_strategy="no")
    record = RecordAdapter(resumed)
    resumed.add_callback(record)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo"):
        resumed.train(resume_from_checkpoint=True)
    assert "Resuming from" in caplog.text and f"{out}/checkpoint-2;" in caplog.text
    assert "checkpoint-4 (its trainer_state.json is missing or unreadable" in caplog.text
    assert "checkpoint-3 (its adapter pytorch_lora_weights.safetensors is missing or truncated)" in caplog.text
    assert len(record.states) == 3  # steps 3 and 4 were run again
    assert _equal(straight.adapter_state_dict(), resumed.adapter_state_dict())
    leftovers = glob.glob(str(out / "**" / "*.tmp-*"), recursive=True)
    assert leftovers == []

    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-3: its adapter .* truncated"):
        _trainer(out, max_steps=4).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    for name in os.listdir(out):
        if name.startswith("checkpoint-"):
            (out / name / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"holds no complete checkpoint: .*checkpoint-4 .*checkpoint-1"):
        _trainer(out, max_steps=4).train(resume_from_checkpoint=True)


def test_a_crafted_replay_buffer_in_a_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    kwargs = dict(training_mode="semi_on_policy", replay_buffer_size=2)
    trainer = _trainer(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1, **kwargs)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    buffer = checkpoint / "replay_buffer.pt"
    os.remove(buffer)
    torch.save({"capacity": 2, "entries": Payload()}, buffer)
    resumed = _trainer(tmp_path / "run", max_steps=2, **kwargs)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_saved_files_get_the_usual_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        trainer = _trainer(tmp_path, max_steps=1)
        trainer.train()
        trainer.save_model()
        trainer.create_model_card()
    finally:
        os.umask(previous)
    for name in ("pytorch_lora_weights.safetensors", "README.md", "training_args.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ---------------------------------------------------------------- what the trainer trains
def test_modules_to_save_are_trained_saved_and_loaded(tmp_path):
    config = LoraConfig(**LORA, modules_to_save=["proj_out"])
    trainer = _trainer(tmp_path, peft_config=config, max_steps=2, learning_rate=1e-2)
    transformer = trainer.pipeline.transformer
    copy = transformer.proj_out.modules_to_save[trainer.adapter_name]
    base = transformer.proj_out.original_module
    before, base_before = copy.weight.detach().clone(), base.weight.detach().clone()
    assert copy.weight.requires_grad and not base.weight.requires_grad
    trainer.train()
    assert not torch.equal(before, copy.weight)  # the adapter's copy trained
    assert torch.equal(base_before, base.weight)  # the reference's module did not
    trainer.save_model()
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any("proj_out" in k for k in saved)
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.modules_to_save"] == ["proj_out"]

    # the saved file gives back the trained policy: same videos from a fresh pipeline
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = trainer.pipeline("a red fox jumps", generator=generator(), output_type="pt").frames
    fresh = tiny_pipeline()
    fresh.transformer.add_adapter(config, adapter_name="policy")
    load_lora_adapter_weights(fresh.transformer, str(tmp_path), adapter_name="policy")
    got = fresh("a red fox jumps", generator=generator(), output_type="pt").frames
    base = tiny_pipeline()("a red fox jumps", generator=generator(), output_type="pt").frames
    assert torch.equal(expected, got) and not torch.equal(expected, base)


def test_peft_configs_the_trainer_cannot_train_are_refused(tmp_path):
    with pytest.raises(TypeError, match="is a LoHaConfig; ARCoPOTrainer trains LoRA adapters only"):
        _trainer(tmp_path, peft_config=LoHaConfig(r=4, target_modules=["to_q"]))
    with pytest.raises(ValueError, match=r"LoraConfig\(bias='all'\)` trains the base model's biases"):
        _trainer(tmp_path, peft_config=LoraConfig(**LORA, bias="all"))


# ---------------------------------------------------------------- kill -9 at random moments
KILL_TARGET = """
import glob, os, sys
from datasets import Dataset
from peft import LoraConfig
from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.testing_utils import tiny_pipeline

def redness(prompts, videos, **kwargs):
    return (videos[:, :, 0] - videos[:, :, 1:].mean(dim=2)).mean(dim=(1, 2, 3)).tolist()

out = sys.argv[1]
args = ARCoPOConfig(
    output_dir=out, max_steps=24, save_strategy="steps", save_steps=1, num_iterations=2, per_device_train_batch_size=2,
    num_generations=3, num_anchors=2, denoising_sigmas=[1.0, 0.75, 0.5], learning_rate=1e-3, report_to="none",
    use_cpu=True, seed=0, disable_tqdm=True,
)
trainer = ARCoPOTrainer(
    pipeline=tiny_pipeline(), reward_funcs=[redness], args=args,
    train_dataset=Dataset.from_dict({"prompt": PROMPTS}), peft_config=LoraConfig(**LORA),
)
started = bool(glob.glob(os.path.join(out, "checkpoint-*")))
trainer.train(resume_from_checkpoint=True if started else None)
trainer.save_model()
""".replace("PROMPTS", repr(PROMPTS)).replace("LORA", repr(LORA))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "train.py"
    script.write_text(KILL_TARGET)

    def launch(out):
        return subprocess.Popen(
            [sys.executable, str(script), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def first_checkpoint(out, process):
        while process.poll() is None and not (out / "checkpoint-1" / "trainer_state.json").exists():
            time.sleep(0.005)
        return time.perf_counter()

    straight = tmp_path / "straight"
    process = launch(straight)
    start = first_checkpoint(straight, process)
    assert process.wait() == 0, process.stderr.read().decode()[-3000:]
    training_seconds = time.perf_counter() - start  # from the first checkpoint to the end of the script
    expected = load_file(straight / "pytorch_lora_weights.safetensors")

    rng = random.Random(0)
    killed_at = []
    for trial in range(10):
        out = tmp_path / f"killed-{trial}"
        process = launch(out)
        delay = rng.uniform(0, training_seconds)
        first_checkpoint(out, process)
        time.sleep(delay)
        alive = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        newest = f"{saved[-1].name}{'' if (saved[-1] / 'trainer_state.json').exists() else ' (incomplete)'}"
        killed_at.append((round(delay, 3), alive, newest))
        resumed = launch(out)
        assert resumed.wait() == 0, f"trial {trial}: " + resumed.stderr.read().decode()[-3000:]
        got = load_file(out / "pytorch_lora_weights.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"trial {trial} killed at {killed_at[-1]}"
    print(f"training {training_seconds:.2f} s; (delay s, alive when killed, newest checkpoint): {killed_at}")  # noqa: T201
    assert sum(alive for _, alive, _ in killed_at) >= 8  # the kills did land during training
