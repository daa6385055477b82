"""bitsandbytes on CPU: the 8-bit optimizer trains, a LoRA trains on a frozen 4-bit base, and fusing into it is refused."""

import pytest
import torch
from helpers import LORA, redness, tiny_trainer
from peft import LoraConfig

from trl_arcopo import combine_adapters
from trl_arcopo.lora_files import load_lora_adapter_weights
from trl_arcopo.quantization import pipeline_quantization_config, quantized_parameters, require_bitsandbytes
from trl_arcopo.testing_utils import tiny_pipeline


bnb = pytest.importorskip("bitsandbytes")


def test_adamw_8bit_trains_like_adamw(tmp_path):
    runs = {}
    for optim in ("adamw_torch", "adamw_bnb_8bit"):
        trainer = tiny_trainer(tmp_path / optim, optim=optim, max_steps=3, num_iterations=1)
        before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
        trainer.train()
        runs[optim] = trainer.adapter_state_dict()
        assert all(torch.isfinite(v).all() for v in runs[optim].values())
        assert any(not torch.equal(before[k], v) for k, v in runs[optim].items())
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.args.optim_bits == 8
    # the adapter's tensors are below bitsandbytes' 4096-element threshold, so its states stay in 32 bits: the two
    # optimizers take the same steps up to float rounding
    difference = max((runs["adamw_torch"][k] - v).abs().max().item() for k, v in runs["adamw_bnb_8bit"].items())
    assert difference < 1e-4


def quantized_tiny_pipeline():
    """
    The tiny pipeline (width 64) with its blocks' linear layers swapped for frozen NF4 `Linear4bit` layers, where
    bitsandbytes' CPU kernels allow it (inputs a multiple of its 64-element blocks, outputs of 32): all of them here.
    bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first inference forward, and that
    layout then fails in training forwards (an in-place bias add on a tensor that needs a gradient); the layers
    here keep the portable layout (`support_avx512bf16_for_cpu = False`). GPUs are not concerned.
    """
    pipe = tiny_pipeline(heads=2, head_dim=32, ffn_dim=64)

    def swap(module):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % 64 == 0 and child.out_features % 32 == 0:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                layer = layer.to("cpu")  # quantised here
                layer.support_avx512bf16_for_cpu = False
                setattr(module, name, layer)
            else:
                swap(child)

    swap(pipe.transformer.blocks)
    return pipe


def _video(pipe):
    return pipe("a red fox jumps", generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_lora_trains_on_a_frozen_4bit_base_and_round_trips(tmp_path):
    pipe = quantized_tiny_pipeline()
    quantized = quantized_parameters(pipe.transformer)
    assert len(quantized) == 2 * (8 + 2)  # per block: attn1 and attn2 (q, k, v, out) and the FFN (in, out)
    weights = [p for n, p in pipe.transformer.named_parameters() if n in quantized]
    base = [(p.detach().clone(), p.quant_state.absmax.clone()) for p in weights]
    trainer = tiny_trainer(tmp_path, pipe=pipe, max_steps=2, num_iterations=1, reward_funcs=(redness,),
                           peft_config=LoraConfig(**LORA))  # fmt: skip
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.train()
    after = trainer.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the LoRA trains
    assert len(quantized_parameters(pipe.transformer)) == len(quantized)  # the LoRA wraps them, still 4-bit
    for p, (packed, absmax) in zip(weights, base):  # the 4-bit base is bit-identical
        assert torch.equal(p, packed) and torch.equal(p.quant_state.absmax, absmax) and not p.requires_grad
    trainer.save_model(str(tmp_path / "adapter"))
    trained = _video(pipe)

    fresh = quantized_tiny_pipeline()  # same seed: the same base, quantised the same way
    fresh.transformer.add_adapter(LoraConfig(**LORA), adapter_name=trainer.adapter_name)
    load_lora_adapter_weights(fresh.transformer, str(tmp_path / "adapter"), adapter_name=trainer.adapter_name)
    assert torch.equal(_video(fresh), trained)
    fresh.transformer.disable_adapters()
    assert not torch.equal(_video(fresh), trained)


def test_fusing_into_a_quantized_base_is_refused():
    pipe = quantized_tiny_pipeline()
    for name in ("semi", "on_policy"):
        pipe.transformer.add_adapter(LoraConfig(**LORA), adapter_name=name)
    with pytest.raises(ValueError, match=r"fuse=True.*quantised base weights .*bitsandbytes.*Use `fuse=False`"):
        combine_adapters(pipe, fuse=True)
    combine_adapters(pipe, fuse=False)  # separate adapters work on a quantised base


def test_quantization_config_and_missing_bitsandbytes(monkeypatch):
    config = pipeline_quantization_config(4)
    assert config.quant_backend == "bitsandbytes_4bit" and config.components_to_quantize == ["transformer"]
    assert pipeline_quantization_config(None) is None
    with pytest.raises(ValueError, match="`bits=3`"):
        pipeline_quantization_config(3)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    with pytest.raises(
        ImportError, match=r"Loading the transformer in 8 bits needs bitsandbytes.*trl_arcopo\[quantization\]"
    ):
        require_bitsandbytes("Loading the transformer in 8 bits")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers quantises only on a GPU")
def test_qlora_through_diffusers_on_a_gpu(tmp_path):
    """A saved pipeline reloaded with its transformer in 4 bits by diffusers trains a LoRA with the base frozen."""
    from trl_arcopo import SelfForcingPipeline

    tiny_pipeline(heads=2, head_dim=32, ffn_dim=64).save_pretrained(tmp_path / "pipe")
    pipe = SelfForcingPipeline.from_pretrained(
        tmp_path / "pipe", torch_dtype=torch.bfloat16, quantization_config=pipeline_quantization_config(4)
    ).to("cuda")
    quantized = quantized_parameters(pipe.transformer)
    assert quantized
    weights = [p for n, p in pipe.transformer.named_parameters() if n in quantized]
    base = [p.detach().clone() for p in weights]
    trainer = tiny_trainer(tmp_path / "run", pipe=pipe, max_steps=2, num_iterations=1, use_cpu=False, bf16=True)
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.adapter_state_dict().items())
    assert all(torch.equal(p, b) for p, b in zip(weights, base))
