"""`trl_arcopo.planning` (and `trl-arcopo plan`) against measurements on CPU, closed forms and the library's objects."""

import json
import os
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch
from helpers import ROOT, load_script
from peft import LoraConfig

from trl_arcopo.cli import main as cli_main
from trl_arcopo.planning import (
    DEFAULT_LORA_TARGETS,
    PRESETS,
    UMT5_XXL_ENCODER,
    GeneratorProfile,
    RunSettings,
    TransformerShape,
    VideoShape,
    count_parameters,
    fit,
    load_yaml,
    optimizer_bytes,
    plan,
    plan_config,
    transformer_parameters,
    wan_block_parameters,
    wan_transformer_parameters,
)
from trl_arcopo.testing_utils import tiny_pipeline


BENCHMARKS = os.path.join(ROOT, "benchmarks")
MEMORY_TOLERANCE = 0.15  # the acceptance bound: predicted peak memory within 15 % of the measured one


@pytest.fixture(scope="module")
def bench():
    return load_script(os.path.join(BENCHMARKS, "plan_vs_measured.py"))


# One measured iteration per setting (`benchmarks/plan_vs_measured.py`, smaller groups than the benchmark's so that the
# whole file stays fast): the tiny model with and without gradient checkpointing, in float32 and in bf16 with autocast
# (the GPU setting), and the small model (8 layers, 256 tokens per frame) at a light setting.
SMALL = dict(config="small", num_generations=2, num_anchors=1, pivot=2, num_denoising_steps=1)
SUB_BATCHES = dict(rollout_batch_size=1, anchor_batch_size=1)  # the memory knobs on: one branch, one anchor a forward
SETUPS = {
    "tiny": dict(config="tiny", num_generations=4, num_anchors=2, pivot=2),
    "tiny-checkpointing": dict(config="tiny", num_generations=4, num_anchors=2, pivot=1, checkpointing=True),
    "tiny-bf16-default-lora": dict(
        config="tiny", num_generations=4, num_anchors=2, pivot=2, precision="bf16", targets="default"
    ),
    "small": SMALL,
    "tiny-sub-batches": dict(config="tiny", num_generations=4, num_anchors=2, pivot=1, **SUB_BATCHES),
    "small-sub-batches": {**SMALL, "num_anchors": 2, **SUB_BATCHES},
}


@pytest.fixture
def one_thread():
    """One CPU thread: the counts and bytes do not depend on it, and two threads crawl on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`
    try:
        return {
            name: bench.measure(bench.Setup(output_dir=str(tmp_path_factory.mktemp(name)), **kwargs))
            for name, kwargs in SETUPS.items()
        }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SETUPS))
def test_chunk_passes_and_flops_equal_the_counted_ones(measured, name):
    got, p = measured[name]
    for phase in ("prefix", "branches", "update"):
        assert got["passes"].get(phase, 0) == p.phase(phase).chunk_forwards, phase
        assert p.phase(phase).forward_flops == got["forward_flops"].get(phase, 0), phase  # exact: torch's count
    assert p.phase("update").backward_flops == got["backward_flops"]["update"]


@pytest.mark.parametrize("name", list(SETUPS))
def test_memory_within_tolerance_of_the_allocator_peak(bench, measured, name):
    got, p = measured[name]
    rows = {quantity: (predicted, real) for quantity, predicted, real in bench.compare(got, p)}
    for quantity in ("rollout: peak bytes", "update: activations (one step)", "update: peak bytes"):
        predicted, real = rows[quantity]
        assert abs(predicted / real - 1) <= MEMORY_TOLERANCE, (quantity, predicted, real)


def test_checkpointing_keeps_less_and_recomputes_one_forward(measured):
    (plain, _), (ckpt, p_ckpt) = measured["tiny"], measured["tiny-checkpointing"]
    assert ckpt["activations"] < plain["activations"]
    assert p_ckpt.activations[True].saved < p_ckpt.activations[False].saved
    # the recompute is one more forward of the blocks: the backward grows by less than the whole forward
    extra = p_ckpt.phase("update").backward_flops - replace_checkpointing(p_ckpt, False).phase("update").backward_flops
    assert 0 < extra < p_ckpt.phase("update").forward_flops


def replace_checkpointing(p, on: bool):
    s = p.settings
    config = {**vars(s), "gradient_checkpointing": on, "lora_target_modules": s.lora_target_modules}
    return plan(config, vars(p.transformer), p.video, transformer_parameters_count=p.parameters["transformer"],
                mixed_precision=s.mixed_precision or "no")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("targets", [list(DEFAULT_LORA_TARGETS), ["to_q", "to_v"], r"blocks\.0\.attn1\.to_(q|k)"])
def test_lora_parameters_equal_peft(targets):
    pipe = tiny_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    expected = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    p = plan({"lora_r": 4, "lora_target_modules": targets}, pipe.transformer.config, VideoShape.from_pipeline(pipe))
    assert p.parameters["lora"] == expected


@pytest.mark.parametrize("rollout_batch_size", [None, 2])
def test_transformer_parameters_and_kv_cache_equal_the_built_objects(rollout_batch_size):
    from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise

    pipe = tiny_pipeline()
    shape = TransformerShape.from_config(pipe.transformer.config)
    built = sum(p.numel() for p in pipe.transformer.parameters())
    assert transformer_parameters(shape) == wan_transformer_parameters(shape) == built  # what `plan` counts
    video = VideoShape.from_pipeline(pipe)
    settings = dict(
        num_generations=3, num_anchors=2, per_device_train_batch_size=2, rollout_batch_size=rollout_batch_size
    )
    embeds, _ = pipe.encode_prompt(["a red fox", "a cat"])
    noise = RolloutNoise.sample(pipe.latent_shape(2, 16, 16, 9, 3), 3, 4, generator=torch.Generator().manual_seed(0))
    for pivot in range(video.num_chunks):
        p = plan({**settings, "pivot_chunk": pivot}, pipe.transformer.config, video)
        items = {m.name.split(" (")[0]: m.bytes for m in p.memory}
        branch = neighbor_noise(noise.chunk_initial(pivot), 3, 0.5, torch.Generator().manual_seed(1))
        fork = forked_rollout(pipe, embeds, noise, pivot, branch, *pipe.get_schedule(), 16, 16,
                              rollout_batch_size=rollout_batch_size)  # fmt: skip
        # the prefix once per prompt; the branches' own chunks after it, one sub-batch at a time
        assert items["KV cache: prefix"] == fork.prefix_cache.nbytes
        assert items["KV cache: branches"] == fork.branch_cache_bytes
        assert p.phase("branches").chunk_forwards == fork.num_forward_passes - p.phase("prefix").chunk_forwards


def test_preset_frozen_components_equal_meta_builds():
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    preset = PRESETS["self-forcing-1.3b"]
    assert preset.vae_parameters == count_parameters(AutoencoderKLWan, {})
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER))
    assert preset.text_encoder_parameters == sum(p.numel() for p in encoder.parameters())
    assert preset.video.latent_frames == 21 and preset.video.num_chunks == 7
    assert preset.video.tokens_per_frame(TransformerShape.from_config(preset.transformer)) == 30 * 52


@pytest.mark.parametrize("eight_bit", [False, True])
def test_optimizer_state_equals_adamw_after_one_step(eight_bit):
    pipe = tiny_pipeline(num_layers=1, heads=2, head_dim=160, ffn_dim=512)  # factors above 4096 elements
    pipe.transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(DEFAULT_LORA_TARGETS)))
    params = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    if eight_bit:
        bnb = pytest.importorskip("bitsandbytes")
        optimizer = bnb.optim.AdamW(params, lr=1e-3, optim_bits=8)  # what optim="adamw_bnb_8bit" builds
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0 and not key.startswith("qmap"):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    p = plan({"lora_r": 16, "optim": "adamw_bnb_8bit" if eight_bit else "adamw_torch"}, pipe.transformer.config,
             VideoShape.from_pipeline(pipe))  # fmt: skip
    assert optimizer_bytes([t.numel() for t in params], eight_bit) == sum(storages.values())
    assert next(m.bytes for m in p.memory if m.name.startswith("optimizer state")) == sum(storages.values())


def test_costs_scale_as_the_algorithm_says():
    base = dict(num_generations=4, num_anchors=2, num_iterations=1, pivot_chunk=1, torch_dtype="bfloat16", bf16=True)
    p = plan(base, "self-forcing-1.3b")
    double_g = plan({**base, "num_generations": 8}, "self-forcing-1.3b")
    assert double_g.phase("branches").flops == pytest.approx(2 * p.phase("branches").flops)
    assert double_g.phase("prefix").flops == p.phase("prefix").flops  # the prefix is paid once per prompt
    more_updates = plan({**base, "num_iterations": 2, "num_anchors": 4}, "self-forcing-1.3b")
    assert more_updates.phase("update").flops == pytest.approx(4 * p.phase("update").flops)
    fewer_steps = plan({**base, "train_denoising_steps": [0]}, "self-forcing-1.3b")
    assert fewer_steps.phase("update").flops == pytest.approx(p.phase("update").flops / 4)
    with_beta = plan({**base, "beta": 0.1}, "self-forcing-1.3b")
    assert with_beta.phase("reference").chunk_forwards == with_beta.phase("update").chunk_forwards
    # a uniform pivot costs the mean of the fixed pivots
    uniform = plan({**base, "pivot_chunk": None}, "self-forcing-1.3b")
    fixed = [plan({**base, "pivot_chunk": c}, "self-forcing-1.3b") for c in range(7)]
    for phase in ("prefix", "branches", "update"):
        mean = sum(f.phase(phase).flops for f in fixed) / 7
        assert uniform.phase(phase).flops == pytest.approx(mean)
    # time is FLOPs over MFU x peak; more processes do not change the per-process plan
    assert plan(base, "self-forcing-1.3b", mfu=0.7).seconds == pytest.approx(p.seconds / 2)
    assert plan(base, "self-forcing-1.3b", num_processes=8).seconds == pytest.approx(p.seconds)


def test_settings_from_an_arcopo_config_equal_those_from_its_dict(tmp_path):
    from trl_arcopo import ARCoPOConfig

    fields = dict(num_generations=6, num_anchors=3, num_iterations=3, beta=0.5, pivot_chunk=2, activation_checkpointing=True,
                  denoising_sigmas=[1.0, 0.5], optim="adamw_torch", rollout_batch_size=2, anchor_batch_size=1,
                  offload_text_encoder=True, decode_batch_size=None)  # fmt: skip
    args = ARCoPOConfig(str(tmp_path), use_cpu=True, report_to="none", **fields)
    assert RunSettings.from_config(args) == RunSettings.from_config(fields)


# ---------------------------------------------------------------------------------------------------- configs and CLI
def test_yaml_generators_resolve_like_the_loaded_pipelines():
    from trl_arcopo.shapes import load_pretrained_pipeline

    tiny = plan_config(load_yaml(os.path.join(ROOT, "examples", "configs", "tiny.yaml")))
    pipe = tiny_pipeline()
    assert tiny.parameters["transformer"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert tiny.parameters["text_encoder"] == sum(p.numel() for p in pipe.text_encoder.parameters())
    folder = GeneratorProfile.resolve("moving-shapes")
    loaded = GeneratorProfile.from_pipeline(load_pretrained_pipeline())
    assert folder.video == loaded.video and folder.text_encoder_parameters == loaded.text_encoder_parameters
    assert (folder.num_denoising_steps, folder.sampler) == (loaded.num_denoising_steps, loaded.sampler)
    assert transformer_parameters(TransformerShape.from_config(folder.transformer)) == loaded.transformer_parameters


def _cli(*argv) -> str:
    out = StringIO()
    with redirect_stdout(out):
        cli_main(["plan", *argv])
    return out.getvalue()


def test_cli_warns_when_the_peak_exceeds_the_gpu(tmp_path):
    config = os.path.join(ROOT, "examples", "configs", "self_forcing.yaml")
    path = str(tmp_path / "plan.json")
    text = _cli(config, "--preset", "self-forcing-1.3b", "--gpu", "h100", "h200", "--json", path)
    with open(path) as f:
        plans = json.load(f)
    assert [p["gpu"]["name"] for p in plans] == ["NVIDIA H100 SXM5 80GB", "NVIDIA H200 SXM 141GB"]
    for p in plans:
        assert p["fits"] == (p["peak_memory_bytes"] <= p["gpu"]["memory_bytes"])
        assert bool(p["warnings"]) == (not p["fits"])
    assert text.count("WARNING") == sum(not p["fits"] for p in plans)
    assert "| branches |" in text and "KV cache: branches" in text
    grid = _cli(config, "--preset", "self-forcing-1.3b", "--gpu", "h200", "--grid", "--num_generations", "8")
    assert grid.count("| NVIDIA H200") == 4 and "adamw_bnb_8bit" in grid


def test_fit_finds_the_fastest_setting_that_fits():
    """Acceptance: the paper's setting fits an 80 GB H100 with 15 % headroom, at most 1.05x the seconds of the plan
    before the memory knobs (34.5 s); G = 24 fits an H200."""
    config = load_yaml(os.path.join(ROOT, "examples", "configs", "self_forcing.yaml"))
    best, tried = fit(config, "self-forcing-1.3b", gpu="h100")
    assert best is not None and best.peak_memory_bytes <= 0.85 * best.gpu.memory_bytes <= 68 * 2**30
    assert best.seconds <= 1.05 * 34.5
    fitting = [p for p in tried if p.peak_memory_bytes <= 0.85 * p.gpu.memory_bytes]
    assert round(best.seconds, 1) == min(round(p.seconds, 1) for p in fitting)
    knobs = ("rollout_batch_size", "anchor_batch_size", "offload_text_encoder", "activation_checkpointing")
    defaults = {**{k: v for k, v in config.items() if k not in knobs}, "activation_checkpointing": True}
    assert plan_config(defaults, "self-forcing-1.3b", gpu="h100").peak_memory_bytes > 0.85 * best.gpu.memory_bytes
    # sub-batches and the offloaded text encoder lower the peak without changing the FLOPs
    base = plan_config(defaults, "self-forcing-1.3b", gpu="h100", pivot_chunk=0)
    sub = plan_config(defaults, "self-forcing-1.3b", gpu="h100", pivot_chunk=0, rollout_batch_size=3,
                      anchor_batch_size=1, offload_text_encoder=True)  # fmt: skip
    assert sub.peak_memory_bytes < base.peak_memory_bytes
    assert sub.phase("update").flops == pytest.approx(base.phase("update").flops)
    assert sub.phase("branches").flops == pytest.approx(base.phase("branches").flops, rel=1e-3)
    h200, _ = fit({**config, "num_generations": 24}, "self-forcing-1.3b", gpu="h200")
    assert h200 is not None and h200.settings.num_generations == 24
    text = _cli(os.path.join(ROOT, "examples", "configs", "self_forcing.yaml"), "--preset", "self-forcing-1.3b",
                "--fit", "--gpu", "h100")  # fmt: skip
    assert "Fastest setting that fits the NVIDIA H100" in text and "--rollout_batch_size" in text


def test_cli_errors_name_the_value_and_the_fix(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", os.path.join(ROOT, "examples", "configs", "self_forcing.yaml")])
    assert "--preset self-forcing-1.3b" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pivot_chunk=9"):
        plan({"pivot_chunk": 9}, "self-forcing-1.3b")
    with pytest.raises(ValueError, match="gpu='v100'"):
        plan({}, "self-forcing-1.3b", gpu="v100")
    with pytest.raises(ValueError, match="matches no linear layer"):
        plan({"lora_target_modules": ["conv_in"]}, "self-forcing-1.3b")
    with pytest.raises(ValueError, match="num_frames=80"):
        plan({"num_frames": 80}, "self-forcing-1.3b")
    with pytest.raises(TypeError, match="num_generation"):
        plan({}, "self-forcing-1.3b", num_generation=8)


# ---------------------------------------------------------------------------------------------------- the GPU check
def test_gpu_check_tiny_runs_the_same_code_path_on_cpu(tmp_path, one_thread):
    gpu_check = load_script(os.path.join(BENCHMARKS, "gpu_check.py"))
    assert gpu_check.main(["--tiny", "--output_dir", str(tmp_path)]) == 0
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    assert report["failures"] == []
    assert all(r["passed"] for r in report["streaming"].values())
    for row in report["results"]["rows"]:
        assert row["passes"] == row["predicted_passes"]
        assert abs(row["peak_bytes"] / row["predicted_peak_bytes"] - 1) <= MEMORY_TOLERANCE
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")


# ---------------------------------------------------------------------------------------------------- presets
# The generators `trl-arcopo-convert` makes, by preset: (format, variant) of `pipeline_settings`.
CONVERTED = {
    "self-forcing-1.3b": ("self-forcing", None),
    "longlive-1.3b": ("longlive", None),
    "causal-forcing-1.3b": ("causal-forcing", "chunkwise"),
    "causal-forcing-1.3b-framewise": ("causal-forcing", "framewise"),
    "krea-14b": ("krea", None),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_transformer_parameters_equal_the_closed_form_and_a_diffusers_build(name):
    from diffusers import WanTransformer3DModel

    shape = TransformerShape.from_config(PRESETS[name].transformer)
    with torch.device("meta"):
        wan = WanTransformer3DModel(**PRESETS[name].transformer)
    assert (
        wan_transformer_parameters(shape) == transformer_parameters(shape) == sum(p.numel() for p in wan.parameters())
    )
    assert wan_block_parameters(shape) == sum(p.numel() for p in wan.blocks[0].parameters())
    expected = 14_288_491_584 if name == "krea-14b" else 1_418_996_800  # Wan2.1-T2V-14B, Wan2.1-T2V-1.3B
    assert transformer_parameters(shape) == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_stream_as_the_converted_pipelines(name):
    """Chunk, cache policy, window, sink and steps as `trl-arcopo-convert` writes them in the pipeline config."""
    from trl_arcopo.convert import pipeline_settings

    settings = pipeline_settings(*CONVERTED[name])
    preset, spec = PRESETS[name], GeneratorProfile.from_preset(name)
    video = preset.video
    assert spec.video == video and spec.transformer == preset.transformer
    assert (video.num_frames_per_chunk, video.cache_policy, video.local_attn_frames, video.sink_frames) == (
        settings["default_num_frames_per_chunk"], settings["cache_policy"], settings["local_attn_frames"],
        settings["sink_frames"],
    )  # fmt: skip
    assert preset.num_denoising_steps == len(settings["default_sigmas"] or [1.0, 0.75, 0.5, 0.25])
    assert (video.height, video.width, video.latent_frames) == (480, 832, 21)
    assert preset.text_encoder_parameters == PRESETS["self-forcing-1.3b"].text_encoder_parameters
    # wherever self-forcing-1.3b works: plan, plan_config, GeneratorProfile.resolve and the CLI
    p = plan({"torch_dtype": "bfloat16", "bf16": True}, name)
    shape = TransformerShape.from_config(preset.transformer)
    assert p.video == video and p.parameters["transformer"] == transformer_parameters(shape)
    assert plan_config({"pipeline_name_or_path": name}).video == video
    text = _cli(os.path.join(ROOT, "examples", "configs", "self_forcing.yaml"), "--preset", name)
    assert f"KV cache {video.cache_policy}" in text and "| branches |" in text


def test_long_videos_are_counted_in_latent_frames():
    """`num_frames` is pixel frames: Wan's VAE makes `1 + (num_frames - 1) / 4` latent frames, in chunks of 3."""
    p = plan({"num_frames": 957, "torch_dtype": "bfloat16", "bf16": True}, "longlive-1.3b")  # 59.8 s at 16 fps
    assert (p.video.latent_frames, p.video.num_chunks) == (240, 80)
    with pytest.raises(ValueError, match=r"241 latent frames \(`num_frames=961`\).*e\.g\. 957 \(240 latent frames\)"):
        plan({"num_frames": 961}, "longlive-1.3b")


# ---------------------------------------------------------------------------------------------------- cache policies
def _with_policy(pipe, policy, window=None, sink=0):
    pipe.register_to_config(cache_policy=policy, local_attn_frames=window, sink_frames=sink)
    return pipe


@pytest.mark.parametrize(("policy", "window", "sink"), [("full", 4, 1), ("rolling", 4, 1), ("recompute", 6, 1)])
def test_kv_cache_of_every_policy_equals_the_built_caches(policy, window, sink, tmp_path, one_thread):
    """
    The prefix's and the branches' caches against a forked rollout's at every pivot (a recompute cache's branches
    against a video's cache after its last commit: a fork measures them before its first), 4 chunks of 3 frames.
    """
    from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise

    pipe = _with_policy(tiny_pipeline(), policy, window, sink)
    video = VideoShape.from_pipeline(pipe)
    assert (video.cache_policy, video.local_attn_frames, video.sink_frames) == (policy, window, sink)
    pipe.save_pretrained(tmp_path)
    assert GeneratorProfile.from_folder(str(tmp_path)).video == video
    embeds, _ = pipe.encode_prompt(["a red fox", "a cat"])
    noise = RolloutNoise.sample(pipe.latent_shape(2, 16, 16, 12, 3), 3, 4, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = pipe.get_schedule()
    with torch.no_grad():  # the branches' cache at the end of one video, as its last commit leaves it
        ended = pipe.prepare_cache(6, 9, 16, 16)
        pipe.generate_latents(embeds.repeat_interleave(3, 0), noise.repeat_interleave(3), ended, timesteps, sigmas)
    for pivot in range(4):
        p = plan({"num_generations": 3, "num_anchors": 2, "per_device_train_batch_size": 2, "pivot_chunk": pivot,
                  "num_frames": 12}, pipe.transformer.config, video)  # fmt: skip
        items = {m.name.split(" (")[0]: m.bytes for m in p.memory}
        branch = neighbor_noise(noise.chunk_initial(pivot), 3, 0.5, torch.Generator().manual_seed(1))
        fork = forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16)
        assert items["KV cache: prefix"] == fork.prefix_cache.nbytes
        if policy != "recompute" or pivot == 3:
            assert items["KV cache: branches"] == fork.branch_cache_bytes
        else:
            assert items["KV cache: branches"] == ended.nbytes
            assert items["KV cache rebuilt by a commit next to the old one"] == ended.kv.nbytes


LONG_VIDEOS = (81, 165, 333)  # 21, 42 and 84 latent frames: 7, 14 and 28 chunks of 3


def test_rolling_kv_cache_does_not_grow_with_the_video_and_a_full_one_does():
    base = dict(num_generations=12, num_anchors=4, pivot_chunk=2, torch_dtype="bfloat16", bf16=True)
    shape = TransformerShape.from_config(PRESETS["longlive-1.3b"].transformer)
    per_frame = shape.num_layers * 2 * 1560 * shape.num_attention_heads * shape.attention_head_dim * 2  # one video
    full = []
    for frames in LONG_VIDEOS:
        p = plan({**base, "num_frames": frames}, "longlive-1.3b")
        items = {m.name.split(" (")[0]: m.bytes for m in p.memory}
        # layers x 2 x window x tokens per frame x heads x head dim x bytes x videos (1 prompt, 12 branches)
        assert items["KV cache: prefix"] == 12 * per_frame * 1
        assert items["KV cache: branches"] == p.branch_cache_bytes == 12 * per_frame * 12
        f = plan({**base, "num_frames": frames}, "self-forcing-1.3b")
        full.append({m.name.split(" (")[0]: m.bytes for m in f.memory}["KV cache: branches"])
        assert full[-1] == (p.video.num_chunks - 1 - 2) * 3 * per_frame * 12  # every frame after the prefix
    assert full[2] - full[1] == 2 * (full[1] - full[0])  # linear in the length


def test_rollout_flops_grow_linearly_under_a_window_and_quadratically_without():
    base = dict(num_generations=12, num_anchors=4, pivot_chunk=0, torch_dtype="bfloat16", bf16=True)

    def rollout(preset: str, frames: int) -> float:
        p = plan({**base, "num_frames": frames}, preset)
        return p.phase("prefix").flops + p.phase("branches").flops

    windowed = [rollout("longlive-1.3b", frames) for frames in LONG_VIDEOS]  # 2x the chunks: 2x the added FLOPs
    assert windowed[2] - windowed[1] == pytest.approx(2 * (windowed[1] - windowed[0]))
    for preset in ("krea-14b", "causal-forcing-1.3b"):
        flops = [rollout(preset, frames) for frames in LONG_VIDEOS]
        if preset == "krea-14b":
            assert flops[2] - flops[1] == pytest.approx(2 * (flops[1] - flops[0]))
        else:  # global attention: every chunk reads every frame before it
            assert flops[2] - flops[1] > 2.5 * (flops[1] - flops[0])
    # the update reads the pivot's window: the same at every length
    updates = {
        plan({**base, "num_frames": f, "pivot_chunk": 5}, "longlive-1.3b").phase("update").flops for f in LONG_VIDEOS
    }
    assert len(updates) == 1


@pytest.mark.parametrize(("chunk", "window", "sink"), [(3, 6, 1), (2, 7, 1), (1, 4, 0)])
def test_recompute_commits_are_the_forwards_the_cache_runs(chunk, window, sink):
    """
    `VideoShape.commit_forwards` against the forwards `RecomputeKVCache.commit` calls: the next chunk's context in
    blocks of a chunk from its first frame, each attending to itself and the blocks before it ((2, 7, 1): 5 context
    frames, blocks of 2, 2 and 1).
    """
    from trl_arcopo.kv_cache import CacheLayout, make_cache

    num_chunks = 6
    video = VideoShape(16, 16, chunk * num_chunks, chunk, cache_policy="recompute", local_attn_frames=window,
                       sink_frames=sink)  # fmt: skip
    cache = make_cache("recompute", CacheLayout(1, 1, 4, 2), 1, chunk * num_chunks, window, sink)
    calls = []  # (frames, attended frames) of each forward of one commit

    def forward(x, kv, start):
        calls.append((x.shape[2], start + x.shape[2]))

    for c in range(num_chunks - 1):
        calls.clear()
        cache.commit(torch.zeros(1, 1, chunk, 1, 1), c * chunk, forward)
        assert video.commit_forwards(c) == calls
        assert video.prefix_cache_frames(c + 1) == len(cache.frame_indices)
        assert video.attended_frames(c + 1) == len(cache.frame_indices) + chunk  # the context and the chunk


def test_recompute_replaces_each_commit_by_a_forward_over_the_context():
    """Krea: a commit is one forward of the 3 context frames (sink and the 2 most recent), a chunk reads 6 at most."""
    from trl_arcopo.planning import _LoRALayout, _Pass, forward_flops

    base = dict(num_generations=4, num_anchors=2, num_iterations=1, torch_dtype="bfloat16", bf16=True, pivot_chunk=2)
    p = plan(base, "krea-14b")
    shape = TransformerShape.from_config(PRESETS["krea-14b"].transformer)
    lora = _LoRALayout.build(shape, DEFAULT_LORA_TARGETS)

    def forward(frames: int, attended: int) -> float:
        return forward_flops(shape, _Pass(frames * 1560, attended * 1560, 512, frames), lora, 64)

    context = forward(3, 3)
    denoise = [forward(3, min(3 * (c + 1), 6)) for c in range(7)]
    assert p.phase("prefix").forward_flops == pytest.approx(4 * sum(denoise[:2]) + 2 * context)
    assert p.phase("branches").forward_flops == pytest.approx(4 * (4 * sum(denoise[2:]) + 4 * context))  # 4 commits
    assert (p.phase("prefix").chunk_forwards, p.phase("branches").chunk_forwards) == (2 * 5, 4 * (5 * 4 + 4))
    assert p.phase("update").forward_flops == pytest.approx(8 * denoise[2])  # the pivot reads its context only
    # with every frame stored under the same window, chunk c >= 1's commit reads 6 frames instead of 3
    full = plan({**base, "cache_policy": "full"}, "krea-14b")
    saved = full.phase("branches").forward_flops - p.phase("branches").forward_flops
    assert saved == pytest.approx(4 * 4 * (denoise[2] - context))
    items = {m.name.split(" (")[0]: m.bytes for m in p.memory}
    per_frame = 40 * 2 * 1560 * 40 * 128 * 2
    assert items["KV cache: branches"] == 4 * 3 * (per_frame + 16 * 60 * 104 * 4)  # 3 frames and their latents
    assert {m.name.split(" (")[0]: m.bytes for m in full.memory}[
        "KV cache: branches"
    ] == 4 * 12 * per_frame  # chunks 2..5


# ---------------------------------------------------------------------------------------------------- FSDP
def test_fsdp_shards_the_transformer_the_lora_and_its_optimizer_state():
    base = dict(num_generations=8, num_anchors=8, split_groups_across_processes=True, torch_dtype="bfloat16",
                bf16=True, activation_checkpointing=True)  # fmt: skip
    whole = plan(base, "krea-14b", num_processes=8)
    sharded = plan({**base, "fsdp": True}, "krea-14b", num_processes=8)
    shape = TransformerShape.from_config(PRESETS["krea-14b"].transformer)
    block, total = wan_block_parameters(shape), wan_transformer_parameters(shape)
    items = {m.name.split(" (")[0].split(",")[0]: m.bytes for m in sharded.memory}
    # a 1/8 shard, plus the parameters outside the blocks and 2 blocks gathered
    assert items["transformer weights"] == (total // 8 + (total - 40 * block) + 2 * block) * 2
    lora_block = 8 * 64 * (5120 + 5120) + 64 * (5120 + 13824) * 2  # q, k, v, out of both attentions; the FFN
    assert sharded.parameters["lora"] == 40 * lora_block
    assert items["LoRA parameters"] == items["LoRA gradients"] == (40 * lora_block // 8 + 2 * lora_block) * 4
    optimizer = next(m.bytes for m in whole.memory if m.name.startswith("optimizer state"))
    assert items["optimizer state"] == optimizer // 8
    assert sharded.peak_memory_bytes < whole.peak_memory_bytes and sharded.flops == whole.flops
    with pytest.raises(ValueError, match="num_processes=1"):
        plan({"fsdp": True}, "krea-14b")


def test_krea_14b_fits_8_h100s_with_fsdp_and_split_groups():
    """docs/planning.md, "Krea realtime 14B": the fastest setting that fits each H100 with 15 % headroom."""
    config = load_yaml(os.path.join(ROOT, "examples", "configs", "self_forcing.yaml"))
    split = dict(num_generations=8, num_anchors=8, split_groups_across_processes=True)
    best, _ = fit({**config, **split, "fsdp": True}, "krea-14b", gpu="h100", num_processes=8)
    assert best is not None and best.settings.gradient_checkpointing
    assert (round(best.seconds, 1), round(best.peak_memory_bytes / 2**30, 1)) == (26.4, 28.1)
    assert round(best.flops * 8 / 1e15, 1) == 73.1  # PFLOP per iteration, the 8 GPUs together
    without_fsdp, _ = fit({**config, **split}, "krea-14b", gpu="h100", num_processes=8)
    assert round(without_fsdp.peak_memory_bytes / 2**30, 1) == 52.6
    one_gpu, _ = fit(config, "krea-14b", gpu="h100")  # whole groups of 12 on one H100
    assert (round(one_gpu.seconds, 1), round(one_gpu.peak_memory_bytes / 2**30, 1)) == (152.7, 66.2)


def test_a_reward_window_keeps_only_its_frames_of_the_decoded_videos():
    """LongLive at 60 s, G = 12: with a window of 3 of the 80 chunks, the decoded videos kept shrink to the window's
    frames, plus the one video a decode call holds whole."""
    config = {"num_frames": 957, "num_generations": 12}
    whole = plan_config(config, "longlive-1.3b", gpu="h100")
    window = plan_config(config, "longlive-1.3b", gpu="h100", reward_window_chunks=2, reward_context_chunks=1)
    pixels = 957 * 3 * 480 * 832 * 4
    latents = 12 * 16 * 240 * 60 * 104 * 4
    assert whole.memory_by_phase("decode") == 12 * pixels + latents
    assert window.memory_by_phase("decode") == 12 * (pixels * 3 // 80 + pixels // 12) + latents


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_generations=1, num_anchors=1),
        dict(num_generations=4, num_anchors=5),
        dict(num_iterations=0),
        dict(per_device_train_batch_size=0),
        dict(beta=-1.0),
        dict(rollout_batch_size=0),
        dict(train_denoising_steps=[1, 1]),
    ],
)
def test_the_planner_refuses_what_the_config_refuses_with_the_same_message(tmp_path, bad):
    from trl_arcopo import ARCoPOConfig

    with pytest.raises(ValueError) as config_error:
        ARCoPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **bad)
    with pytest.raises(ValueError) as plan_error:
        RunSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in bad.items()})
    assert str(plan_error.value) == str(config_error.value)
