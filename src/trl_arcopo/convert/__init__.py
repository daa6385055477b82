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
"""
Convert an original streaming-generator checkpoint into a diffusers [`SelfForcingPipeline`] folder.

Four releases share Self-Forcing's code lineage (a causal Wan2.1 transformer saved as a plain state dict under the
original Wan parameter names) and convert the same way. They differ in the file layout and in how they sample, which
the converted pipeline's config records (`format`, see [`pipeline_settings`]):

| format | reference | file | latent frames per chunk | steps | KV cache (window / sink frames) |
| --- | --- | --- | --- | --- | --- |
| `self-forcing` | guandeh17/Self-Forcing | `.pt` | 3 | 4 | full |
| `longlive` | NVlabs/LongLive v1.0 | `.pt`, and a PEFT LoRA `.pt` | 3 | 4 | rolling, 12 / 3 |
| `causal-forcing` | thu-ml/Causal-Forcing | `.pt` | 3 or 1 (`variant`) | 4, 2 or 1 | full |
| `krea` | krea-ai/realtime-video (14B) | `.safetensors` | 3 | 4 | recompute, 6 / 1 |

Only the transformer weights come from the checkpoint: the tokenizer, the UMT5 text encoder, the VAE and the
transformer config are taken from a Wan2.1-T2V diffusers folder (1.3B; 14B for Krea).

```bash
hf download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt --local-dir .
hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir Wan2.1-T2V-1.3B-Diffusers
trl-arcopo-convert --checkpoint checkpoints/self_forcing_dmd.pt --wan_pipeline Wan2.1-T2V-1.3B-Diffusers \\
    --output self-forcing-diffusers
```

The output then loads with `SelfForcingPipeline.from_pretrained("self-forcing-diffusers")`; `docs/convert.md` gives
the command of every format.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoTokenizer, UMT5EncoderModel

from ..lora_files import LORA_WEIGHT_NAME, save_lora_adapter
from ..models import CausalWanTransformer3DModel
from ..pipelines import SelfForcingPipeline
from ..sampling import self_forcing_scheduler
from .formats import (
    CAUSAL_FORCING_VARIANTS,
    DTYPES,
    FORMATS,
    LONGLIVE_LORA_ALPHA,
    LORA_A_SUFFIX,
    LORA_ADAPTER_NAME,
    _check_lora_fits,
    _lora_layers,
    _wan_base,
    convert_lora_state_dict,
    convert_self_forcing_state_dict,
    load_generator_state_dict,
    load_lora_checkpoint,
    load_self_forcing_checkpoint,
    merge_lora_state_dict,
    pipeline_settings,
)


__all__ = [
    "CAUSAL_FORCING_VARIANTS",
    "FORMATS",
    "convert_checkpoint",
    "convert_lora_state_dict",
    "convert_self_forcing_checkpoint",
    "convert_self_forcing_state_dict",
    "load_generator_state_dict",
    "load_lora_checkpoint",
    "load_self_forcing_checkpoint",
    "main",
    "merge_lora_state_dict",
    "pipeline_settings",
]

logger = logging.getLogger(__name__)


def _add_lora_adapter(
    transformer: CausalWanTransformer3DModel, lora_state_dict: dict[str, torch.Tensor], lora_alpha: float
) -> None:
    """Add the diffusers-named LoRA to `transformer` as the adapter `LORA_ADAPTER_NAME`, with its weights."""
    layers = _lora_layers(lora_state_dict)
    rank = lora_state_dict[layers[0] + LORA_A_SUFFIX].shape[0]
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=layers)
    transformer.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    result = set_peft_model_state_dict(transformer, lora_state_dict, adapter_name=LORA_ADAPTER_NAME)
    missing = get_peft_model_state_dict(transformer, adapter_name=LORA_ADAPTER_NAME).keys() - lora_state_dict.keys()
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:  # a safety net: the layers were checked against the weights before
        raise RuntimeError(f"The LoRA did not load: missing keys {sorted(missing)[:5]}, unexpected {unexpected[:5]}.")


def _keeps_fp32(name: str, modules: list[str]) -> bool:
    return any(module in name.split(".") for module in modules)


def _build_transformer(
    state_dict: dict[str, torch.Tensor],
    config_path: str | os.PathLike,
    dtype: torch.dtype,
    wan_base: str = "Wan2.1-T2V-1.3B",
) -> CausalWanTransformer3DModel:
    """A `CausalWanTransformer3DModel` from a config folder and diffusers-named weights, cast like diffusers does."""
    config = CausalWanTransformer3DModel.load_config(config_path)
    with init_empty_weights():  # parameters on `meta`, filled below; buffers (RoPE tables) built normally
        transformer = CausalWanTransformer3DModel.from_config(config)
    fix = f"The checkpoint must be a {wan_base} model, and `wan_pipeline_path` a {wan_base} diffusers folder."
    expected = transformer.state_dict().keys()
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"The converted checkpoint does not fit the transformer config in {config_path}: "
            f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}. {fix}"
        )
    # as diffusers' `from_pretrained(torch_dtype=...)`: `_keep_in_fp32_modules` (norms, modulation, ...) stay fp32
    keep = transformer._keep_in_fp32_modules or []
    state_dict = {
        name: tensor.to(torch.float32 if _keeps_fp32(name, keep) else dtype) if tensor.is_floating_point() else tensor
        for name, tensor in state_dict.items()
    }
    try:
        transformer.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(
            f"The converted checkpoint does not fit the transformer config in {config_path}: {error} {fix}"
        ) from error
    return transformer.eval()


def _check_output(output_path: Path, overwrite: bool) -> None:
    if not output_path.exists() or overwrite:
        return
    if not output_path.is_dir() or any(output_path.iterdir()):
        raise FileExistsError(f"{output_path} already exists and is not empty; pass `overwrite=True` / `--overwrite`.")


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    wan_pipeline_path: str | os.PathLike,
    output_path: str | os.PathLike,
    format: str = "self-forcing",
    variant: str | None = None,
    lora_path: str | os.PathLike | None = None,
    lora_alpha: float = LONGLIVE_LORA_ALPHA,
    merge_lora: bool = False,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SelfForcingPipeline:
    r"""
    Convert a streaming generator's checkpoint into a [`SelfForcingPipeline`] saved at `output_path`.

    The transformer config, tokenizer, text encoder and VAE come from `wan_pipeline_path`; the transformer weights from
    the checkpoint (which must match that config exactly); the chunk size, schedule and KV-cache policy of the
    pipeline's config from `format` (see [`pipeline_settings`]). Every argument and both files are checked before
    anything is written. The folder is written next to `output_path` under a temporary name and renamed into place at
    the end, so an interrupted run never leaves a half-written output.

    Args:
        checkpoint_path (`str` or `os.PathLike`):
            The generator file: Self-Forcing's `checkpoints/self_forcing_dmd.pt`, LongLive's `models/longlive_base.pt`,
            one of Causal-Forcing's `causal_forcing.pt` / `framewise-{1,2}step.pt`, or Krea realtime's
            `krea-realtime-video-14b.safetensors`.
        wan_pipeline_path (`str` or `os.PathLike`):
            A Wan2.1-T2V diffusers folder with `tokenizer`, `text_encoder`, `vae` and `transformer/config.json`:
            Wan2.1-T2V-1.3B, or Wan2.1-T2V-14B for `"krea"`.
        output_path (`str` or `os.PathLike`):
            The folder to write.
        format (`str`, defaults to `"self-forcing"`):
            One of `FORMATS`: `"self-forcing"`, `"longlive"`, `"causal-forcing"` or `"krea"`.
        variant (`str`, *optional*):
            `"causal-forcing"` only, required: `"chunkwise"`, `"framewise"`, `"framewise-2step"` or
            `"framewise-1step"` (the file's folder and name on the Hub).
        lora_path (`str` or `os.PathLike`, *optional*):
            `"longlive"` only: the PEFT LoRA file (`models/lora.pt`). With `merge_lora=False` it is saved next to the
            pipeline as `pytorch_lora_weights.safetensors` in the diffusers format (load it with
            `pipe.load_lora_weights(output_path)`, e.g. as the adapter that training goes on with), and the returned
            pipeline's transformer carries it as the adapter `"default"`.
        lora_alpha (`float`, defaults to 256):
            The LoRA's alpha (LongLive v1.0: 256, as its rank); the rank is read from the tensors.
        merge_lora (`bool`, defaults to `False`):
            Merge the LoRA into the transformer weights (`W + (alpha / r)·B·A`, in fp32) instead of saving it apart.
        use_ema (`bool`, defaults to `True`):
            Use the EMA weights (`generator_ema`) when the checkpoint has them (Krea's file has one state dict).
        dtype (`torch.dtype`, defaults to `torch.float32`):
            Dtype of the transformer and the text encoder. As in diffusers, the transformer's
            `_keep_in_fp32_modules` stay fp32; the VAE is always fp32.
        overwrite (`bool`, defaults to `False`):
            Replace an existing non-empty `output_path`.

    Returns:
        [`SelfForcingPipeline`]: the converted pipeline (on CPU), as saved.
    """
    settings = pipeline_settings(format, variant)
    if lora_path is not None and format != "longlive":
        raise ValueError(
            f"`lora_path` (`--lora`) is for `format='longlive'` (LongLive's `models/lora.pt`); {format!r} has no "
            "LoRA file."
        )
    if merge_lora and lora_path is None:
        raise ValueError("`merge_lora=True` (`--merge_lora`) needs the LoRA file: pass `lora_path` / `--lora`.")
    wan_base = _wan_base(format)
    wan_path, output_path = Path(wan_pipeline_path), Path(output_path)
    _check_output(output_path, overwrite)
    if not (wan_path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"{wan_path / 'transformer' / 'config.json'} not found: `wan_pipeline_path` must be a {wan_base} "
            f"diffusers folder (e.g. `hf download Wan-AI/{wan_base}-Diffusers --local-dir ...`)."
        )

    logger.info(f"Reading {checkpoint_path} ({format})")
    state_dict = convert_self_forcing_state_dict(load_generator_state_dict(checkpoint_path, format, use_ema))
    lora = None
    if lora_path is not None:
        logger.info(f"Reading the LoRA {lora_path}")
        lora = convert_lora_state_dict(load_lora_checkpoint(lora_path))
        if merge_lora:
            state_dict = merge_lora_state_dict(state_dict, lora, lora_alpha)
            lora = None
        else:
            _check_lora_fits(state_dict, lora)
    transformer = _build_transformer(state_dict, wan_path / "transformer", dtype, wan_base)
    del state_dict

    logger.info(f"Loading the tokenizer, text encoder and VAE from {wan_path}")
    tokenizer = AutoTokenizer.from_pretrained(wan_path / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(wan_path / "text_encoder", dtype=dtype).eval()
    vae = AutoencoderKLWan.from_pretrained(wan_path / "vae", torch_dtype=torch.float32).eval()
    pipeline = SelfForcingPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=self_forcing_scheduler(),
        vae=vae,
        default_height=480,
        default_width=832,
        default_num_frames=81,
        **settings,
    )

    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.tmp-", dir=output_path.parent))
    try:
        pipeline.save_pretrained(staging)  # the base weights: the adapter is added after
        if lora is not None:
            _add_lora_adapter(pipeline.transformer, lora, lora_alpha)
            save_lora_adapter(pipeline.transformer, staging, adapter_name=LORA_ADAPTER_NAME)
        _check_output(output_path, overwrite)  # nothing appeared meanwhile
        if output_path.is_dir() and not any(output_path.iterdir()):
            output_path.rmdir()
        if output_path.exists():  # overwrite: move the old output aside, then delete it once the new one is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.old-", dir=output_path.parent))
            os.replace(output_path, previous / output_path.name)
            os.replace(staging, output_path)
            shutil.rmtree(previous)
        else:
            os.replace(staging, output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"Saved the SelfForcingPipeline to {output_path}")
    if lora is not None:
        logger.info(
            f"The LoRA (r={transformer.peft_config[LORA_ADAPTER_NAME].r}, alpha={lora_alpha:g}) is saved as "
            f"{output_path / LORA_WEIGHT_NAME}: load it with `pipe.load_lora_weights({str(output_path)!r})`."
        )
    return pipeline


def convert_self_forcing_checkpoint(
    checkpoint_path: str | os.PathLike,
    wan_pipeline_path: str | os.PathLike,
    output_path: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SelfForcingPipeline:
    r"""
    Convert a Self-Forcing checkpoint into a [`SelfForcingPipeline`] saved at `output_path`: [`convert_checkpoint`]
    with `format="self-forcing"`.

    Args:
        checkpoint_path (`str` or `os.PathLike`): the Self-Forcing `.pt` file (e.g. `checkpoints/self_forcing_dmd.pt`
            of the Hub repo `gdhe17/Self-Forcing`).
        wan_pipeline_path (`str` or `os.PathLike`): a Wan2.1-T2V-1.3B diffusers folder with `tokenizer`,
            `text_encoder`, `vae` and `transformer/config.json`.
        output_path (`str` or `os.PathLike`): the folder to write.
        use_ema (`bool`, defaults to `True`): use the EMA weights (`generator_ema`) when the checkpoint has them.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the transformer and the text encoder. As in
            diffusers, the transformer's `_keep_in_fp32_modules` stay fp32; the VAE is always fp32.
        overwrite (`bool`, defaults to `False`): replace an existing non-empty `output_path`.

    Returns:
        [`SelfForcingPipeline`]: the converted pipeline (on CPU), as saved.
    """
    return convert_checkpoint(
        checkpoint_path, wan_pipeline_path, output_path, use_ema=use_ema, dtype=dtype, overwrite=overwrite
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point `trl-arcopo-convert` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="trl-arcopo-convert",
        description=(
            "Convert an original streaming-generator checkpoint (Self-Forcing, LongLive, Causal-Forcing, Krea "
            "realtime) into a diffusers SelfForcingPipeline folder."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Generator file: a .pt (e.g. self_forcing_dmd.pt, longlive_base.pt) or Krea's .safetensors.",
    )
    parser.add_argument(
        "--wan_pipeline",
        required=True,
        help="Wan2.1-T2V-1.3B-Diffusers folder (Wan2.1-T2V-14B for krea): tokenizer, text encoder, VAE, config.",
    )
    parser.add_argument("--output", required=True, help="Folder to write the SelfForcingPipeline to.")
    parser.add_argument(
        "--format", choices=FORMATS, default="self-forcing", help="Checkpoint format (sets chunk, steps, KV cache)."
    )
    parser.add_argument("--variant", choices=CAUSAL_FORCING_VARIANTS, help="Causal-Forcing release (required there).")
    parser.add_argument("--lora", help="LongLive's PEFT LoRA file (models/lora.pt).")
    parser.add_argument(
        "--lora_alpha", type=float, default=LONGLIVE_LORA_ALPHA, help="LoRA alpha (rank read from the file)."
    )
    parser.add_argument(
        "--merge_lora",
        action="store_true",
        help="Merge the LoRA into the weights (default: save it as pytorch_lora_weights.safetensors).",
    )
    parser.add_argument("--no_ema", action="store_true", help="Use `generator` instead of `generator_ema`.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Transformer/text encoder dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert_checkpoint(
        args.checkpoint,
        args.wan_pipeline,
        args.output,
        format=args.format,
        variant=args.variant,
        lora_path=args.lora,
        lora_alpha=args.lora_alpha,
        merge_lora=args.merge_lora,
        use_ema=not args.no_ema,
        dtype=DTYPES[args.dtype],
        overwrite=args.overwrite,
    )
    print(f"Saved the SelfForcingPipeline to {args.output}")


if __name__ == "__main__":
    main()
