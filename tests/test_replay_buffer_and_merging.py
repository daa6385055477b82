import os

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from trl_arcopo import RolloutNoise, SelfForcingPipeline, forked_rollout, neighbor_noise
from trl_arcopo.merging import combine_adapters
from trl_arcopo.replay_buffer import BufferEntry, ReplayBuffer, rebuild_prefix_cache
from trl_arcopo.testing_utils import tiny_pipeline


def _entry(i, g=3):
    return BufferEntry(
        prompt=f"prompt {i}",
        prompt_embeds=torch.full((4, 8), float(i)),
        pivot=1,
        prefix_latents=torch.full((3, 3, 4, 4), float(i)),
        states=torch.randn(g, 2, 3, 3, 4, 4),
        x0_preds=torch.randn(g, 2, 3, 3, 4, 4),
        rewards=torch.arange(g, dtype=torch.float32) + i,
    )


def test_add_overflow_sample_and_state_dict(tmp_path):
    buffer = ReplayBuffer(capacity=3)
    for i in range(5):
        buffer.add(_entry(i))
    assert len(buffer) == 3 and buffer.num_added == 5
    assert [e.prompt for e in buffer.entries] == ["prompt 2", "prompt 3", "prompt 4"]  # oldest dropped first
    a = buffer.sample(2, generator=torch.Generator().manual_seed(0))
    b = buffer.sample(2, generator=torch.Generator().manual_seed(0))
    assert [e.prompt for e in a] == [e.prompt for e in b] and a[0].prompt != a[1].prompt
    with pytest.raises(ValueError, match="Cannot sample 4"):
        buffer.sample(4)
    buffer.save(str(tmp_path / "buffer.pt"))
    loaded = ReplayBuffer.load(str(tmp_path / "buffer.pt"))
    assert loaded.capacity == 3 and loaded.num_added == 5 and len(loaded) == 3
    for x, y in zip(buffer.entries, loaded.entries):
        assert x.prompt == y.prompt and x.pivot == y.pivot
        assert torch.equal(x.states, y.states) and torch.equal(x.x0_preds, y.x0_preds)
        assert torch.equal(x.rewards, y.rewards) and torch.equal(x.prefix_latents, y.prefix_latents)
    assert buffer.nbytes == sum(e.nbytes for e in loaded.entries) > 0
    assert not any(name.startswith("buffer.pt.tmp") for name in os.listdir(tmp_path))
    with pytest.raises(ValueError, match="capacity=0"):
        ReplayBuffer(0)
    bad = _entry(0)
    bad.rewards = torch.zeros(5)
    with pytest.raises(ValueError, match="Inconsistent entry"):
        buffer.add(bad)


class _Touch:
    """Unpickling this runs `Path.touch(marker)`: a stand-in for a crafted file that executes code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_load_refuses_a_crafted_pickle_without_running_it(tmp_path):
    """A genuine buffer loads with `weights_only=True`; a file whose unpickling would run code is refused unrun."""
    marker = tmp_path / "code-ran"
    state = ReplayBuffer(capacity=2).state_dict()
    state["entries"] = [_Touch(str(marker))]
    torch.save(state, tmp_path / "replay_buffer.pt")
    with pytest.raises(ValueError, match="not a replay buffer written by `ReplayBuffer.save`.*replay_buffer_path"):
        ReplayBuffer.load(str(tmp_path / "replay_buffer.pt"))
    assert not marker.exists()
    # the same payload through plain pickle does run, so the test would notice a loader that unpickled it
    torch.load(tmp_path / "replay_buffer.pt", weights_only=False)
    assert marker.exists()


def test_informative_sampling_skips_groups_with_equal_rewards():
    buffer = ReplayBuffer(capacity=6)
    for i in range(6):
        entry = _entry(i)
        if i % 2:  # every odd group: all candidates scored alike, so zero advantage
            entry.rewards = torch.full((3,), 0.5)
        buffer.add(entry)
    assert buffer.informative_indices() == [0, 2, 4]
    for seed in range(5):
        drawn = buffer.sample(3, generator=torch.Generator().manual_seed(seed), informative_only=True)
        assert sorted(e.prompt for e in drawn) == ["prompt 0", "prompt 2", "prompt 4"]
    assert len(buffer.sample(6)) == 6  # without the filter every group can be drawn
    with pytest.raises(ValueError, match="Cannot sample 4 entries from a buffer with 3 informative"):
        buffer.sample(4, informative_only=True)


def test_prefix_cache_is_rebuilt_exactly(pipe):
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    noise = RolloutNoise.sample(pipe.latent_shape(1, 16, 16, 9, 3), 3, 4, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = pipe.get_schedule()
    pivot = 2
    branch = neighbor_noise(noise.chunk_initial(pivot), 3, 0.5, torch.Generator().manual_seed(1))
    group = forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16)
    entry = BufferEntry(
        prompt="a red fox jumps",
        prompt_embeds=embeds[0],
        pivot=pivot,
        prefix_latents=group.latents[0, :, : 3 * pivot],
        states=group.states,
        x0_preds=group.x0_preds,
        rewards=torch.zeros(3),
    )
    cache = rebuild_prefix_cache(pipe, entry, num_frames_per_chunk=3, num_latent_frames=9)
    assert cache.end == group.prefix_cache.end
    for layer in range(cache.num_layers):
        end = cache.end
        assert torch.equal(cache.keys[layer][:, :end], group.prefix_cache.keys[layer][:, :end])
        assert torch.equal(cache.values[layer][:, :end], group.prefix_cache.values[layer][:, :end])


def _two_adapter_pipe(tmp_path):
    source = tiny_pipeline()
    paths = {}
    for seed, name in ((1, "semi"), (2, "on_policy")):
        torch.manual_seed(seed)
        source.transformer.add_adapter(
            LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]), adapter_name=name
        )
        paths[name] = tmp_path / name
        SelfForcingPipeline.save_lora_weights(
            paths[name],
            transformer_lora_layers=get_peft_model_state_dict(source.transformer, adapter_name=name),
            transformer_lora_adapter_metadata=source.transformer.peft_config[name].to_dict(),
        )
    pipe = tiny_pipeline()
    for name, path in paths.items():
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def _manual_delta_sum_output(pipe, x, t, text, scale):
    """W0 + ΔW_semi + scale·ΔW_on computed by hand on a fresh base model."""
    base = tiny_pipeline().transformer
    tr = pipe.transformer
    with torch.no_grad():
        for name, module in base.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.endswith(("to_q", "to_v")):
                continue
            lora = tr.get_submodule(name)
            delta = torch.zeros_like(module.weight)
            for adapter, weight in (("semi", 1.0), ("on_policy", scale)):
                a = lora.lora_A[adapter].weight
                b = lora.lora_B[adapter].weight
                config = tr.peft_config[adapter]
                delta += weight * (config.lora_alpha / config.r) * (b @ a)
            module.weight += delta
        return base(x, t, text).sample


def test_combined_adapters_equal_weighted_sum_of_deltas(tmp_path):
    pipe = _two_adapter_pipe(tmp_path)
    x, text, t = torch.randn(1, 3, 3, 16, 16), torch.randn(1, 4, 32), torch.tensor([500.0])
    combine_adapters(pipe, scale=0.6)
    with torch.no_grad():
        weighted = pipe.transformer(x, t, text).sample
    manual = _manual_delta_sum_output(pipe, x, t, text, 0.6)
    assert (weighted - manual).abs().max() <= 1e-5
    combine_adapters(pipe, scale=0.6, fuse=True)
    pipe.unload_lora_weights()
    with torch.no_grad():
        fused = pipe.transformer(x, t, text).sample
    assert (fused - weighted).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="not loaded"):
        combine_adapters(tiny_pipeline())
