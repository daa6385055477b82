import filecmp
import inspect
import json
import logging
import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from trl_arcopo import CausalWanTransformer3DModel, SelfForcingPipeline
from trl_arcopo.convert import (
    convert_checkpoint,
    convert_lora_state_dict,
    convert_self_forcing_checkpoint,
    convert_self_forcing_state_dict,
    load_generator_state_dict,
    load_self_forcing_checkpoint,
    main,
    merge_lora_state_dict,
    pipeline_settings,
)
from trl_arcopo.lora_files import load_lora_adapter_weights
from trl_arcopo.testing_utils import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae


# diffusers name -> original Wan2.1 name, matched on whole dot-separated segments
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    ("to_out.0", "o"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("scale_shift_table", "modulation"),
    # diffusers' norm2 is the cross-attention norm (original norm3) and its norm3 the FFN norm (original norm2)
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
)


def to_original_key(key: str) -> str:
    """The original Wan2.1 name of a diffusers `WanTransformer3DModel` parameter (the inverse of the conversion)."""
    if key == "scale_shift_table":
        return "head.modulation"
    key = f".{key}."
    for new, old in _TO_ORIGINAL:
        key = key.replace(f".{new}.", f".{old}.")
    return key[1:-1]


def to_self_forcing(state_dict: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + to_original_key(key): tensor.clone() for key, tensor in state_dict.items()}


@pytest.fixture(scope="module")
def wan():
    """A stock (non-causal) tiny Wan transformer: the weights the checkpoint is made from."""
    return tiny_transformer(causal=False, seed=1)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory, wan):
    """What `convert` reads from a Wan2.1-T2V-1.3B-Diffusers folder, in tiny."""
    folder = tmp_path_factory.mktemp("wan-diffusers")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_transformer(causal=False, seed=2).save_pretrained(folder / "transformer")  # only its config is used
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wan):
    """A Self-Forcing style `.pt`: `generator` = the tiny weights, `generator_ema` = the same + 1."""
    path = tmp_path_factory.mktemp("self-forcing") / "self_forcing_dmd.pt"
    generator = to_self_forcing(wan.state_dict())
    torch.save({"generator": generator, "generator_ema": {k: v + 1 for k, v in generator.items()}}, path)
    return path


def _assert_same_state_dict(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_reverse_mapping_produces_original_names(wan):
    names = set(to_self_forcing(wan.state_dict(), prefix=""))
    for name in [
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.o.bias",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.0.cross_attn.k.weight",
        "blocks.0.norm3.weight",
        "blocks.0.modulation",
        "blocks.0.ffn.0.weight",
        "blocks.1.ffn.2.bias",
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "head.head.weight",
        "head.modulation",
    ]:
        assert name in names
    assert not any("norm2" in name for name in names)  # Wan's FFN norm has no affine parameters


@pytest.mark.parametrize("prefix", ["model.", "", "model._fsdp_wrapped_module.", "_orig_mod.model."])
def test_convert_state_dict_is_exact_inverse(wan, prefix):
    original = to_self_forcing(wan.state_dict(), prefix=prefix)
    converted = convert_self_forcing_state_dict(original)
    _assert_same_state_dict(converted, wan.state_dict())
    assert len(original) == len(converted)  # the input is left untouched


def test_convert_state_dict_rejects_diffusers_names(wan):
    with pytest.raises(ValueError, match="already uses diffusers names"):
        convert_self_forcing_state_dict(wan.state_dict())


def test_load_checkpoint_picks_ema(checkpoint):
    ema = load_self_forcing_checkpoint(checkpoint)
    regular = load_self_forcing_checkpoint(checkpoint, use_ema=False)
    assert ema.keys() == regular.keys()
    assert all(torch.equal(ema[k], regular[k] + 1) for k in regular)


def test_load_checkpoint_falls_back_to_generator_with_warning(tmp_path, wan, caplog):
    path = tmp_path / "no_ema.pt"
    torch.save({"generator": to_self_forcing(wan.state_dict())}, path)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo.convert"):
        state_dict = load_self_forcing_checkpoint(path, use_ema=True)
    assert "generator_ema" in caplog.text
    _assert_same_state_dict(convert_self_forcing_state_dict(state_dict), wan.state_dict())


def test_load_checkpoint_accepts_a_bare_state_dict(tmp_path, wan):
    path = tmp_path / "bare.pt"
    torch.save(to_self_forcing(wan.state_dict()), path)
    _assert_same_state_dict(convert_self_forcing_state_dict(load_self_forcing_checkpoint(path)), wan.state_dict())


def test_load_checkpoint_without_generator_names_the_keys_found(tmp_path):
    path = tmp_path / "critic_only.pt"
    torch.save({"critic": {"w": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match="found keys: 'critic', 'step'"):
        load_self_forcing_checkpoint(path)


@torch.no_grad()
def test_convert_checkpoint_round_trip(tmp_path, wan, wan_folder, checkpoint):
    out = tmp_path / "self-forcing-diffusers"
    converted = convert_self_forcing_checkpoint(checkpoint, wan_folder, out, use_ema=False)
    assert isinstance(converted.transformer, CausalWanTransformer3DModel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self-forcing-diffusers"]  # no staging folder left

    pipe = SelfForcingPipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, CausalWanTransformer3DModel)
    assert (pipe.config.default_height, pipe.config.default_width, pipe.config.default_num_frames) == (480, 832, 81)
    assert pipe.vae is not None and pipe.text_encoder is not None and pipe.tokenizer is not None
    _assert_same_state_dict(pipe.transformer.state_dict(), wan.state_dict())

    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 4, 32, generator=g)
    expected = CausalWanTransformer3DModel.from_wan(wan)(x, t, e).sample  # same forward, original weights
    assert torch.equal(pipe.transformer(x, t, e).sample, expected)
    assert torch.equal(converted.transformer(x, t, e).sample, expected)
    assert (expected - wan(x, t, e).sample).abs().max() <= 1e-5  # and the stock Wan forward agrees


def test_cli_uses_ema_and_dtype(tmp_path, wan, wan_folder, checkpoint):
    out = tmp_path / "nested" / "out"
    main(["--checkpoint", str(checkpoint), "--wan_pipeline", str(wan_folder), "--output", str(out)])
    transformer = CausalWanTransformer3DModel.from_pretrained(out / "transformer")
    _assert_same_state_dict(transformer.state_dict(), {k: v + 1 for k, v in wan.state_dict().items()})

    main(
        ["--checkpoint", str(checkpoint), "--wan_pipeline", str(wan_folder), "--output", str(out)]
        + ["--no_ema", "--dtype", "bfloat16", "--overwrite"]
    )
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert torch.equal(saved["blocks.0.attn1.to_q.weight"], wan.blocks[0].attn1.to_q.weight.bfloat16())
    for name in [
        "blocks.0.scale_shift_table",
        "blocks.0.norm2.weight",
        "condition_embedder.time_embedder.linear_1.bias",
    ]:
        assert saved[name].dtype == torch.float32, name  # `_keep_in_fp32_modules` stay fp32, as in diffusers
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_refuses_to_overwrite_existing_output(tmp_path, wan_folder, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_self_forcing_checkpoint(checkpoint, wan_folder, out)
    with pytest.raises(FileExistsError):
        main(["--checkpoint", str(checkpoint), "--wan_pipeline", str(wan_folder), "--output", str(out)])
    assert (out / "keep.txt").read_text() == "precious"
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_self_forcing_checkpoint(checkpoint, wan_folder, empty)
    assert (empty / "model_index.json").is_file()


def test_mismatched_checkpoint_fails_before_writing(tmp_path, wan, wan_folder):
    state_dict = to_self_forcing(wan.state_dict())
    del state_dict["model.blocks.1.cross_attn.k.weight"]
    state_dict["model.blocks.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save({"generator": state_dict}, path)
    with pytest.raises(ValueError, match=r"1 missing keys \['blocks.1.attn2.to_k.weight'\], 1 unexpected keys"):
        convert_self_forcing_checkpoint(path, wan_folder, tmp_path / "out", use_ema=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]


def test_missing_wan_folder(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="Wan2.1-T2V-1.3B"):
        convert_self_forcing_checkpoint(checkpoint, tmp_path / "nowhere", tmp_path / "out")


# ------------------------------------------------------------------------------------------------- other formats
def _warped(steps: list[int], shift: float = 5.0) -> list[float]:
    """A reference step list warped as `warp_denoising_step: true` does (the scheduler's shift)."""
    return [1000 * shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in steps]


SF_TIMESTEPS = _warped([1000, 750, 500, 250])  # [1000, 937.5, 833.3, 625]
#: every nn.Linear of LongLive's `CausalWanAttentionBlock`: its LoRA's target layers, original names
LONGLIVE_LORA_LAYERS = [f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def make_lora(wan, rank: int = 4, prefix: str = "base_model.model.", infix: str = "", seed: int = 0):
    """A PEFT LoRA state dict on LongLive's layers (original names), random and nonzero (`lora_B` too)."""
    original = to_self_forcing(wan.state_dict(), prefix="")
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(len(wan.blocks)):
        for layer in LONGLIVE_LORA_LAYERS:
            out_features, in_features = original[f"blocks.{i}.{layer}.weight"].shape
            name = f"{prefix}blocks.{i}.{infix}{layer}"
            lora[f"{name}.lora_A.weight"] = 0.1 * torch.randn(rank, in_features, generator=g)
            lora[f"{name}.lora_B.weight"] = 0.1 * torch.randn(out_features, rank, generator=g)
    return lora


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 4, 32, generator=g)


def _written(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_self_forcing_settings_are_the_pipeline_defaults():
    """So that `--format self-forcing` (the default) writes the config the converter always wrote."""
    defaults = inspect.signature(SelfForcingPipeline.__init__).parameters
    settings = pipeline_settings("self-forcing")
    assert settings == {name: defaults[name].default for name in settings}


@pytest.mark.parametrize(
    "format, variant, top_key, prefix, chunk, timesteps, first_timesteps, cache, window, sink",
    [
        ("self-forcing", None, "generator_ema", "model.", 3, SF_TIMESTEPS, None, "full", None, 0),
        ("longlive", None, "generator_ema", "model._fsdp_wrapped_module.", 3, SF_TIMESTEPS, None, "rolling", 12, 3),
        ("longlive", None, "generator", "_fsdp_wrapped_module.model.", 3, SF_TIMESTEPS, None, "rolling", 12, 3),
        ("longlive", None, "model", "model.", 3, SF_TIMESTEPS, None, "rolling", 12, 3),
        ("causal-forcing", "chunkwise", "generator_ema", "model._fsdp_wrapped_module.", 3, SF_TIMESTEPS, None,
         "full", None, 0),
        ("causal-forcing", "framewise", "generator_ema", "model.", 1, SF_TIMESTEPS, None, "full", None, 0),
        ("causal-forcing", "framewise-2step", "generator_ema", "model._fsdp_wrapped_module.", 1,
         _warped([1000, 500]), SF_TIMESTEPS, "full", None, 0),
        ("causal-forcing", "framewise-1step", "generator_ema", "model.", 1, [1000.0], SF_TIMESTEPS, "full", None, 0),
        ("krea", None, None, "model.", 3, [1000, 937, 833, 625], None, "recompute", 6, 1),
    ],
    ids=["self-forcing", "longlive-ema", "longlive-generator", "longlive-model", "causal-forcing-chunkwise",
         "causal-forcing-framewise", "causal-forcing-framewise-2step", "causal-forcing-framewise-1step", "krea"],
)  # fmt: skip
@torch.no_grad()
def test_convert_format_round_trip(
    tmp_path, wan, wan_folder, format, variant, top_key, prefix, chunk, timesteps, first_timesteps, cache, window, sink
):
    generator = to_self_forcing(wan.state_dict(), prefix=prefix)
    if format == "krea":
        path = tmp_path / "krea-realtime-video-14b.safetensors"
        save_file(generator, path)
    else:
        path = tmp_path / "checkpoint.pt"
        content = {top_key: generator}
        if top_key == "generator_ema":  # a decoy that must not be picked
            content["generator"] = {key: value + 1 for key, value in generator.items()}
        torch.save(content, path)
    out = tmp_path / "out"
    convert_checkpoint(path, wan_folder, out, format=format, variant=variant)
    assert _written(tmp_path) == sorted([path.name, "out"])

    pipe = SelfForcingPipeline.from_pretrained(out)
    _assert_same_state_dict(pipe.transformer.state_dict(), wan.state_dict())
    config = pipe.config
    assert (config.default_num_frames_per_chunk, config.cache_policy) == (chunk, cache)
    assert (config.local_attn_frames, config.sink_frames) == (window, sink)
    assert config.default_sampler == "consistency"
    got, sigmas = pipe.get_schedule()
    assert got.tolist() == pytest.approx(timesteps, abs=0.01)  # the reference's timesteps (Krea's: within 0.01)
    assert torch.allclose(sigmas[:-1] * 1000, got) and sigmas[-1] == 0
    if first_timesteps is None:
        assert config.default_first_chunk_sigmas is None
    else:
        assert pipe.get_schedule(config.default_first_chunk_sigmas)[0].tolist() == pytest.approx(first_timesteps)
    x, t, e = _inputs()
    assert torch.equal(pipe.transformer(x, t, e).sample, CausalWanTransformer3DModel.from_wan(wan)(x, t, e).sample)


@pytest.mark.parametrize(
    "prefix, infix",
    [("base_model.model.", ""), ("model.base_model.model.", "_fsdp_wrapped_module."), ("base_model.model.model.", "")],
)
def test_convert_lora_state_dict_follows_the_base_renaming(wan, prefix, infix):
    lora = make_lora(wan, prefix=prefix, infix=infix)
    converted = convert_lora_state_dict(lora)
    layers = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v"]
    layers += ["attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    expected = {f"blocks.{i}.{layer}.lora_{ab}.weight" for i in range(2) for layer in layers for ab in "AB"}
    assert converted.keys() == expected
    assert (
        converted["blocks.1.attn1.to_out.0.lora_A.weight"]
        is lora[f"{prefix}blocks.1.{infix}self_attn.o.lora_A.weight"]
    )
    assert converted["blocks.0.ffn.net.0.proj.lora_B.weight"] is lora[f"{prefix}blocks.0.{infix}ffn.0.lora_B.weight"]
    weights = wan.state_dict()
    for key, tensor in converted.items():  # each adapted layer is a diffusers linear layer of matching size
        weight = weights[key.rsplit(".lora_", 1)[0] + ".weight"]
        assert tensor.shape[1 if ".lora_A." in key else 0] == weight.shape[1 if ".lora_A." in key else 0]


@pytest.mark.parametrize("layout", ["generator_lora", "top-level"])
@torch.no_grad()
def test_longlive_lora_merged_equals_adapter(tmp_path, wan, wan_folder, layout):
    prefix, infix = (
        ("base_model.model.", "") if layout == "generator_lora" else ("base_model.model.", "_fsdp_wrapped_module.")
    )
    lora = make_lora(wan, prefix=prefix, infix=infix)
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora} if layout == "generator_lora" else lora, lora_path)
    base_path = tmp_path / "longlive_base.pt"
    torch.save({"generator_ema": to_self_forcing(wan.state_dict(), prefix="model._fsdp_wrapped_module.")}, base_path)
    kwargs = {"format": "longlive", "lora_path": lora_path, "lora_alpha": 8.0}  # r = 4: scale 2

    convert_checkpoint(base_path, wan_folder, tmp_path / "merged", merge_lora=True, **kwargs)
    returned = convert_checkpoint(base_path, wan_folder, tmp_path / "adapter", **kwargs)
    assert not (tmp_path / "merged" / "pytorch_lora_weights.safetensors").exists()
    saved = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(lora)
    q_a, q_b = (lora[f"{prefix}blocks.0.{infix}self_attn.q.lora_{ab}.weight"] for ab in "AB")
    assert torch.equal(saved["transformer.blocks.0.attn1.to_q.lora_A.weight"], q_a)
    assert torch.equal(saved["transformer.blocks.0.attn1.to_q.lora_B.weight"], q_b)
    assert torch.equal(
        saved["transformer.blocks.1.ffn.net.2.lora_B.weight"], lora[f"{prefix}blocks.1.{infix}ffn.2.lora_B.weight"]
    )

    merged = SelfForcingPipeline.from_pretrained(tmp_path / "merged")
    expected_q = wan.blocks[0].attn1.to_q.weight + 2.0 * q_b @ q_a
    assert torch.allclose(merged.transformer.blocks[0].attn1.to_q.weight, expected_q, atol=1e-6)
    adapted = SelfForcingPipeline.from_pretrained(tmp_path / "adapter")
    _assert_same_state_dict(adapted.transformer.state_dict(), wan.state_dict())  # the base, saved unmerged
    if layout == "generator_lora":
        adapted.load_lora_weights(tmp_path / "adapter")
    else:  # into an adapter made beforehand, as a resumed training does
        targets = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]
        adapted.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        load_lora_adapter_weights(adapted.transformer, tmp_path / "adapter")

    x, t, e = _inputs()
    base_out = CausalWanTransformer3DModel.from_wan(wan)(x, t, e).sample
    merged_out = merged.transformer(x, t, e).sample
    adapted_out = adapted.transformer(x, t, e).sample
    assert (merged_out - adapted_out).abs().max() <= 1e-5
    assert (merged_out - base_out).abs().max() > 1e-2  # the LoRA changes the outputs: the test can fail
    assert list(returned.transformer.peft_config) == ["default"]  # the returned pipeline carries the adapter
    assert (returned.transformer(x, t, e).sample - adapted_out).abs().max() <= 1e-6


def test_merge_lora_state_dict_leaves_its_inputs(wan):
    weights = wan.state_dict()
    lora = convert_lora_state_dict(make_lora(wan))
    merged = merge_lora_state_dict(weights, lora, lora_alpha=4.0)  # r = 4: scale 1
    a, b = lora["blocks.1.ffn.net.0.proj.lora_A.weight"], lora["blocks.1.ffn.net.0.proj.lora_B.weight"]
    assert torch.allclose(merged["blocks.1.ffn.net.0.proj.weight"], weights["blocks.1.ffn.net.0.proj.weight"] + b @ a)
    assert merged["blocks.0.norm2.weight"] is weights["blocks.0.norm2.weight"]  # untouched tensors are shared
    assert torch.equal(weights["blocks.1.ffn.net.0.proj.weight"], wan.blocks[1].ffn.net[0].proj.weight)


@pytest.mark.parametrize("layout", ["generator_lora", "top-level"])
def test_lora_file_as_checkpoint_is_refused(tmp_path, wan, wan_folder, layout):
    lora = make_lora(wan)
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora} if layout == "generator_lora" else lora, path)
    for format in ("longlive", "self-forcing"):
        with pytest.raises(ValueError, match=r"holds LoRA weights .* it is a LoRA file.*`--lora`"):
            convert_checkpoint(path, wan_folder, tmp_path / "out", format=format)
    assert _written(tmp_path) == ["lora.pt"]


def test_generator_file_as_lora_is_refused(tmp_path, wan, wan_folder, checkpoint):
    with pytest.raises(ValueError, match=r"holds no LoRA weights.*found keys: 'generator'.*pass it as the checkpoint"):
        convert_checkpoint(checkpoint, wan_folder, tmp_path / "out", format="longlive", lora_path=checkpoint)
    assert _written(tmp_path) == []


def test_checkpoint_without_generator_is_refused(tmp_path, wan, wan_folder):
    path = tmp_path / "critic_only.pt"
    torch.save({"critic": {"w": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(ValueError, match=r"no `generator_ema`, `generator` or `model` state dict.*'critic', 'step'"):
        convert_checkpoint(path, wan_folder, tmp_path / "out", format="longlive")
    with pytest.raises(ValueError, match=r"no `generator` or `model` state dict"):
        load_generator_state_dict(path, "longlive", use_ema=False)
    longlive = tmp_path / "longlive_base.pt"
    torch.save({"model": to_self_forcing(wan.state_dict())}, longlive)
    with pytest.raises(
        ValueError, match=r"found keys: 'model'\. A `model` state dict is LongLive's.*--format longlive"
    ):
        convert_checkpoint(longlive, wan_folder, tmp_path / "out", format="causal-forcing", variant="chunkwise")
    assert _written(tmp_path) == ["critic_only.pt", "longlive_base.pt"]


def test_pt_and_safetensors_files_of_the_wrong_format_are_refused(tmp_path, wan, wan_folder, checkpoint):
    with pytest.raises(ValueError, match=r"not a `\.safetensors` file: Krea realtime's.*--format self-forcing"):
        convert_checkpoint(checkpoint, wan_folder, tmp_path / "out", format="krea")
    renamed = tmp_path / "krea-realtime-video-14b.safetensors"  # a pickle under a safetensors name
    renamed.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        convert_checkpoint(renamed, wan_folder, tmp_path / "out", format="krea")
    with pytest.raises(ValueError, match=r"safetensors file, but Self-Forcing checkpoints are PyTorch.*--format krea"):
        convert_checkpoint(renamed, wan_folder, tmp_path / "out")
    krea = tmp_path / "krea.safetensors"
    save_file({"model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 2)}, krea)
    with pytest.raises(ValueError, match="it is a LoRA file"):
        convert_checkpoint(krea, wan_folder, tmp_path / "out", format="krea")
    with pytest.raises(ValueError, match="drop `use_ema=False`"):
        convert_checkpoint(krea, wan_folder, tmp_path / "out", format="krea", use_ema=False)
    assert _written(tmp_path) == ["krea-realtime-video-14b.safetensors", "krea.safetensors"]


def test_argument_errors_come_before_any_work(tmp_path, wan_folder, checkpoint):
    out = tmp_path / "out"
    cases = [
        ({"format": "longlive-2"}, r"Unknown `format='longlive-2'`"),
        ({"format": "causal-forcing"}, r"needs `variant` .*framewise-2step"),
        ({"format": "longlive", "variant": "framewise"}, r"is for `format='causal-forcing'` only"),
        ({"lora_path": checkpoint}, r"`lora_path` \(`--lora`\) is for `format='longlive'`"),
        ({"format": "longlive", "merge_lora": True}, r"needs the LoRA file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(tmp_path / "missing.pt", wan_folder, out, **kwargs)
    with pytest.raises(FileNotFoundError, match="Wan2.1-T2V-14B"):
        convert_checkpoint(checkpoint, tmp_path / "nowhere", out, format="krea")
    with pytest.raises(ValueError, match="needs `variant`"):
        main(["--checkpoint", str(checkpoint), "--wan_pipeline", str(wan_folder), "--output", str(out)]
             + ["--format", "causal-forcing"])  # fmt: skip
    assert _written(tmp_path) == []


def test_lora_that_does_not_fit_is_refused(tmp_path, wan, wan_folder):
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": to_self_forcing(wan.state_dict())}, base)
    lora = make_lora(wan)
    lora["base_model.model.blocks.0.ffn.0.lora_A.weight"] = torch.zeros(4, 7)  # another model's width
    torch.save(lora, tmp_path / "lora.pt")
    with pytest.raises(
        ValueError, match=r"The LoRA of `blocks.0.ffn.net.0.proj` is 32x7 but its weight is \[32, 24\]"
    ):
        convert_checkpoint(base, wan_folder, tmp_path / "out", format="longlive", lora_path=tmp_path / "lora.pt")
    assert _written(tmp_path) == ["longlive_base.pt", "lora.pt"]

    lora = make_lora(wan)
    with pytest.raises(ValueError, match="lack their `lora_A` or `lora_B`"):
        convert_lora_state_dict({k: v for k, v in lora.items() if "blocks.1.ffn.2.lora_B" not in k})
    with pytest.raises(ValueError, match=r"`base_model.model.blocks.0.self_attn.q.base_layer.weight` is not a LoRA"):
        convert_lora_state_dict({**lora, "base_model.model.blocks.0.self_attn.q.base_layer.weight": torch.zeros(2, 2)})
    lora["base_model.model.blocks.1.self_attn.k.lora_A.weight"] = torch.zeros(8, 24)
    lora["base_model.model.blocks.1.self_attn.k.lora_B.weight"] = torch.zeros(24, 8)
    with pytest.raises(ValueError, match=r"different ranks \[4, 8\]"):
        convert_lora_state_dict(lora)


def test_cli_formats(tmp_path, wan, wan_folder, checkpoint):
    common = ["--checkpoint", str(checkpoint), "--wan_pipeline", str(wan_folder)]
    main(common + ["--output", str(tmp_path / "default")])
    main(common + ["--output", str(tmp_path / "explicit"), "--format", "self-forcing"])
    compared = filecmp.dircmp(tmp_path / "default", tmp_path / "explicit")
    assert not compared.left_only and not compared.right_only and not compared.diff_files  # byte for byte

    main(common + ["--output", str(tmp_path / "cf"), "--format", "causal-forcing", "--variant", "framewise-2step"])
    config = json.loads((tmp_path / "cf" / "model_index.json").read_text())
    assert (config["default_num_frames_per_chunk"], config["default_sigmas"]) == (1, [1.0, 0.5])
    assert config["default_first_chunk_sigmas"] == [1.0, 0.75, 0.5, 0.25]

    torch.save({"generator_lora": make_lora(wan)}, tmp_path / "lora.pt")
    main(
        common + ["--output", str(tmp_path / "longlive"), "--format", "longlive", "--no_ema"]
        + ["--lora", str(tmp_path / "lora.pt"), "--lora_alpha", "8"]
    )  # fmt: skip
    config = json.loads((tmp_path / "longlive" / "model_index.json").read_text())
    assert (config["cache_policy"], config["local_attn_frames"], config["sink_frames"]) == ("rolling", 12, 3)
    saved = load_file(tmp_path / "longlive" / "pytorch_lora_weights.safetensors")
    assert "transformer.blocks.1.attn2.to_out.0.lora_A.weight" in saved
    _assert_same_state_dict(  # `--no_ema`: `generator`, saved without the LoRA merged
        CausalWanTransformer3DModel.from_pretrained(tmp_path / "longlive" / "transformer").state_dict(),
        wan.state_dict(),
    )


@pytest.mark.slow
@torch.no_grad()
def test_real_self_forcing_checkpoint(tmp_path):
    """
    The real conversion. Set `SELF_FORCING_CKPT` to `checkpoints/self_forcing_dmd.pt` of the Hub repo
    `gdhe17/Self-Forcing` and `WAN_DIFFUSERS` to a `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` folder, then run
    `pytest tests/test_convert.py -m slow`. Generation needs a GPU.
    """
    checkpoint_path, wan_path = os.environ.get("SELF_FORCING_CKPT"), os.environ.get("WAN_DIFFUSERS")
    if not checkpoint_path or not wan_path:
        pytest.skip("set SELF_FORCING_CKPT and WAN_DIFFUSERS to run the real conversion")
    out = tmp_path / "self-forcing-diffusers"
    convert_self_forcing_checkpoint(checkpoint_path, wan_path, out, dtype=torch.bfloat16)
    if not torch.cuda.is_available():
        pytest.skip("converted; generating a video needs a GPU")
    dtypes = {"default": torch.bfloat16, "vae": torch.float32}
    pipe = SelfForcingPipeline.from_pretrained(out, torch_dtype=dtypes).to("cuda")
    video = pipe(
        "a red fox running through fresh snow, cinematic",
        num_frames=21,  # 6 latent frames: 2 chunks, so the KV cache is used
        generator=torch.Generator("cuda").manual_seed(0),
    ).frames[0]
    assert video.shape == (21, 480, 832, 3)
    assert 0.0 <= video.min() and video.max() <= 1.0
    assert video.std() > 0.05  # an image, not a constant
