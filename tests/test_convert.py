import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from trl_arcopo import CausalWanTransformer3DModel, SelfForcingPipeline
from trl_arcopo.convert import (
    convert_self_forcing_checkpoint,
    convert_self_forcing_state_dict,
    load_self_forcing_checkpoint,
    main,
)
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
