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
    GeneratorSpec,
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
)
from trl_arcopo.testing_utils import tiny_pipeline


BENCHMARKS = os.path.join(ROOT, "benchmarks")
MEMORY_TOLERANCE = 0.15  # the acceptance bound: predicted peak memory within 15 % of the measured one
FLOP_TOLERANCE = 0.02  # and FLOPs within 2 % of torch's count (chunk passes exactly)


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
        expected = got["forward_flops"].get(phase, 0)
        assert abs(p.phase(phase).forward_flops - expected) <= FLOP_TOLERANCE * max(expected, 1), phase
    backward = got["backward_flops"]["update"]
    assert abs(p.phase("update").backward_flops - backward) <= FLOP_TOLERANCE * backward


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
    assert transformer_parameters(shape) == sum(p.numel() for p in pipe.transformer.parameters())
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
    folder = GeneratorSpec.resolve("moving-shapes")
    loaded = GeneratorSpec.from_pipeline(load_pretrained_pipeline())
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
