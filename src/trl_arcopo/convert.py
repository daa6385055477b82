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
Convert an original Self-Forcing checkpoint into a diffusers [`SelfForcingPipeline`] folder.

Self-Forcing releases its causal Wan2.1-T2V-1.3B generator as a plain PyTorch file (`generator` / `generator_ema`
state dicts with the original Wan parameter names). Only the transformer weights change: the tokenizer, the UMT5 text
encoder, the VAE and the transformer config are taken from a Wan2.1-T2V-1.3B diffusers folder.

```bash
hf download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt --local-dir .
hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir Wan2.1-T2V-1.3B-Diffusers
trl-arcopo-convert --checkpoint checkpoints/self_forcing_dmd.pt --wan_pipeline Wan2.1-T2V-1.3B-Diffusers \\
    --output self-forcing-diffusers
```

The output then loads with `SelfForcingPipeline.from_pretrained("self-forcing-diffusers")`.
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
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from transformers import AutoTokenizer, UMT5EncoderModel

from .io_utils import load_tensors_only
from .models import CausalWanTransformer3DModel
from .pipelines import SelfForcingPipeline
from .sampling import self_forcing_scheduler


logger = logging.getLogger(__name__)

#: Module-name infixes added by training wrappers (FSDP, activation checkpointing, `torch.compile`), removed anywhere.
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: Leading prefixes of the wrapped generator (Self-Forcing's `WanDiffusionWrapper.model`, ComfyUI-style files).
WRAPPER_PREFIXES = ("model.diffusion_model.", "model.")
#: Names of the generator state dicts inside a Self-Forcing checkpoint.
GENERATOR_KEY, GENERATOR_EMA_KEY = "generator", "generator_ema"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _strip_wrappers(key: str) -> str:
    for infix in WRAPPER_INFIXES:
        key = key.replace(infix, "")
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_self_forcing_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""
    Rename a Self-Forcing (original Wan2.1) transformer state dict to the diffusers `WanTransformer3DModel` layout.

    Wrapper names are removed first (a leading `model.`, and `_fsdp_wrapped_module.` / `_orig_mod.` anywhere), then
    diffusers' own `convert_wan_transformer_to_diffusers` renames the keys (e.g. `blocks.0.self_attn.q` ->
    `blocks.0.attn1.to_q`, and the swap of `norm2` and `norm3`). Tensors are neither copied nor cast.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the generator's state dict; it is not modified.

    Returns:
        `dict[str, torch.Tensor]`: the same tensors under diffusers names.
    """
    if not state_dict:
        raise ValueError("The state dict is empty: there is no transformer to convert.")
    stripped = {}
    for key, tensor in state_dict.items():
        new_key = _strip_wrappers(key)
        if new_key in stripped:
            raise ValueError(f"Two keys of the state dict become `{new_key}` once wrapper names are removed.")
        stripped[new_key] = tensor
    if any(key.startswith("condition_embedder.") or ".attn1." in key for key in stripped):
        raise ValueError(
            "This state dict already uses diffusers names (`condition_embedder.*`, `attn1`): load it with "
            "`CausalWanTransformer3DModel.load_state_dict` directly instead of converting it."
        )
    # diffusers' function empties the dict it is given: pass it our own copy
    return convert_wan_transformer_to_diffusers(stripped)


def load_self_forcing_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> dict[str, torch.Tensor]:
    r"""
    Read the generator state dict (original Wan names) of a Self-Forcing checkpoint.

    Args:
        path (`str` or `os.PathLike`): a `.pt` file holding `generator` and/or `generator_ema` state dicts, or directly
            a state dict. It is read on CPU with `weights_only=True`.
        use_ema (`bool`, defaults to `True`): take `generator_ema` when present; if only `generator` exists, a warning
            is logged and `generator` is used.

    Returns:
        `dict[str, torch.Tensor]`: the chosen state dict, keys unchanged (see [`convert_self_forcing_state_dict`]).
    """
    checkpoint = load_tensors_only(path, "a Self-Forcing checkpoint")
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} does not hold a Self-Forcing checkpoint (got {type(checkpoint).__name__}).")
    if GENERATOR_EMA_KEY in checkpoint and use_ema:
        return checkpoint[GENERATOR_EMA_KEY]
    if GENERATOR_KEY in checkpoint:
        if use_ema:
            logger.warning(
                f"{path} has no `{GENERATOR_EMA_KEY}` weights; using `{GENERATOR_KEY}` (pass `use_ema=False` / "
                "`--no_ema` to silence this)."
            )
        return checkpoint[GENERATOR_KEY]
    if all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint  # the file is the state dict itself
    found = ", ".join(repr(key) for key in list(checkpoint)[:20])
    wanted = f"`{GENERATOR_KEY}`" if not use_ema else f"`{GENERATOR_EMA_KEY}` or `{GENERATOR_KEY}`"
    raise ValueError(f"{path} has no {wanted} state dict (nor is it a state dict itself); found keys: {found}.")


def _keeps_fp32(name: str, modules: list[str]) -> bool:
    return any(module in name.split(".") for module in modules)


def _build_transformer(
    state_dict: dict[str, torch.Tensor], config_path: str | os.PathLike, dtype: torch.dtype
) -> CausalWanTransformer3DModel:
    """A `CausalWanTransformer3DModel` from a config folder and diffusers-named weights, cast like diffusers does."""
    config = CausalWanTransformer3DModel.load_config(config_path)
    with init_empty_weights():  # parameters on `meta`, filled below; buffers (RoPE tables) built normally
        transformer = CausalWanTransformer3DModel.from_config(config)
    expected = transformer.state_dict().keys()
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"The converted checkpoint does not fit the transformer config in {config_path}: "
            f"{len(missing)} missing keys {missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}."
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
            f"The converted checkpoint does not fit the transformer config in {config_path}: {error}"
        ) from error
    return transformer.eval()


def _check_output(output_path: Path, overwrite: bool) -> None:
    if not output_path.exists() or overwrite:
        return
    if not output_path.is_dir() or any(output_path.iterdir()):
        raise FileExistsError(f"{output_path} already exists and is not empty; pass `overwrite=True` / `--overwrite`.")


def convert_self_forcing_checkpoint(
    checkpoint_path: str | os.PathLike,
    wan_pipeline_path: str | os.PathLike,
    output_path: str | os.PathLike,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> SelfForcingPipeline:
    r"""
    Convert a Self-Forcing checkpoint into a [`SelfForcingPipeline`] saved at `output_path`.

    The transformer config, tokenizer, text encoder and VAE come from `wan_pipeline_path`; the transformer weights from
    the checkpoint (which must match that config exactly). The folder is written next to `output_path` under a
    temporary name and renamed into place at the end, so an interrupted run never leaves a half-written output.

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
    wan_path, output_path = Path(wan_pipeline_path), Path(output_path)
    _check_output(output_path, overwrite)
    if not (wan_path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"{wan_path / 'transformer' / 'config.json'} not found: `wan_pipeline_path` must be a Wan2.1-T2V-1.3B "
            "diffusers folder (e.g. `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir ...`)."
        )

    logger.info(f"Reading {checkpoint_path}")
    state_dict = convert_self_forcing_state_dict(load_self_forcing_checkpoint(checkpoint_path, use_ema=use_ema))
    transformer = _build_transformer(state_dict, wan_path / "transformer", dtype)
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
    )

    output_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.tmp-", dir=output_path.parent))
    try:
        pipeline.save_pretrained(staging)
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
    return pipeline


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point `trl-arcopo-convert` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="trl-arcopo-convert",
        description="Convert an original Self-Forcing checkpoint into a diffusers SelfForcingPipeline folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="Self-Forcing .pt file (e.g. self_forcing_dmd.pt).")
    parser.add_argument(
        "--wan_pipeline",
        required=True,
        help="Wan2.1-T2V-1.3B-Diffusers folder (tokenizer, text encoder, VAE, config).",
    )
    parser.add_argument("--output", required=True, help="Folder to write the SelfForcingPipeline to.")
    parser.add_argument("--no_ema", action="store_true", help="Use `generator` instead of `generator_ema`.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Transformer/text encoder dtype.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert_self_forcing_checkpoint(
        args.checkpoint,
        args.wan_pipeline,
        args.output,
        use_ema=not args.no_ema,
        dtype=DTYPES[args.dtype],
        overwrite=args.overwrite,
    )
    print(f"Saved the SelfForcingPipeline to {args.output}")


if __name__ == "__main__":
    main()
