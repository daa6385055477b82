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
Runs the reference implementations on tiny random models and writes the parity fixtures. It runs in the side
environment that `make_fixtures.py` builds (transformers 4.45.2, torchvision, the `hpsv3` wheel, VideoAlign's source),
not in trl_arcopo's: `python reference_driver.py --videoalign-src DIR --out tests/fixtures/parity --work DIR`.

What it does, with seed 0 everywhere:

1. A Qwen2-VL-shaped tokenizer (byte-level BPE over the 256 bytes, no merges, Qwen2's special tokens and chat
   template) and a tiny random `Qwen2VLForConditionalGeneration` (text hidden 32, 2 layers; vision 16 wide, 2
   blocks), saved as a base model folder the references load with `from_pretrained`.
2. VideoAlign: the reward model built by VideoAlign's own `create_model_and_processor` (reward tokens added, LoRA
   r=4 on the language model), its LoRA B matrices randomised (they start at zero), saved as a release folder
   (`model_config.json`, `config.json`, `checkpoint-1/model.pth`, `checkpoint-1/tokenizer/`), then loaded and run by
   VideoAlign's `VideoVLMRewardInference` in float32 (and in bfloat16) on the videos of `common.videoalign_videos()`.
3. HPSv3: the reward model built by the `hpsv3` wheel's `create_model_and_processor` (2-output MLP head), saved as
   `HPSv3.safetensors`, then loaded and run by `HPSv3RewardInferencer` in float32 on the frames of
   `common.hpsv3_videos()`, each as an image.

The random weights are rounded to bfloat16 values before anything is saved or run, so that the fixtures store them in
bfloat16 (half the size) without changing a value. The references run unmodified, except: VideoAlign's inference asks
for flash-attention 2, which this CPU run replaces with SDPA (the same attention); and its videos come from an
in-memory stand-in for `decord.VideoReader` (16 fps) instead of decoded files, so that the frames are exactly the
uint8 arrays of `common.py`. The references' own frame sampling, resizing, processor and forward are used.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


SEED = 0
CHECKPOINT_STEP = 1
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2's pre-tokenisation (irrelevant without merges, kept for fidelity)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VIDEOALIGN_CALIBRATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
RELEASE_BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"


def round_to_bfloat16_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).to(tensor.dtype))


def tensor_sha256(tensor: torch.Tensor) -> str:
    return common.sha256(tensor.detach().cpu().numpy())


def ids_sha256(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The sha256 of each row's unpadded token ids, as int64."""
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        rows.append(hashlib.sha256(ids[mask.bool()].to(torch.int64).numpy().tobytes()).hexdigest())
    return rows


def save_bf16(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))


# ------------------------------------------------------------------------------------------------------ base model
def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[3:]})
    tokenizer.add_tokens(["<|im_start|>"], special_tokens=True)
    tokenizer.chat_template = common.QWEN2_VL_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_base(folder: Path):
    """The tiny Qwen2-VL (random, bfloat16 values in float32) with its processor, saved to `folder`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        tie_word_embeddings=False,
        torch_dtype="float32",
        # 10x Qwen2-VL's 0.02: weights large enough that the scores move with the pixels (at 0.02 the tiny model's
        # scores barely depend on the frames, and a parity check of them would check little)
        initializer_range=0.2,
        vision_config={
            "depth": 2,
            "embed_dim": 16,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).eval()
    round_to_bfloat16_(model)
    model.save_pretrained(folder, safe_serialization=True)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, chat_template=common.QWEN2_VL_CHAT_TEMPLATE
    )
    processor.save_pretrained(folder)
    return ids


# ------------------------------------------------------------------------------------------------------ VideoAlign
class _FakeVideoReader:
    """`decord.VideoReader` over the in-memory videos of `common.py`: `[F, H, W, 3]` uint8 at `VIDEO_FPS`."""

    videos: dict[str, np.ndarray] = {}

    def __init__(self, path: str):
        self.frames = self.videos[path]

    def __len__(self) -> int:
        return len(self.frames)

    def get_avg_fps(self) -> float:
        return common.VIDEO_FPS

    def get_batch(self, index):
        return types.SimpleNamespace(asnumpy=lambda: self.frames[list(index)].copy())


def videoalign_model_config(base: Path, dtype: str) -> dict:
    return {
        "data_config": {
            "meta_data": "/path/to/dataset/meta_data.csv",
            "data_dir": "/path/to/dataset",
            "meta_data_test": None,
            "max_frame_pixels": common.VIDEOALIGN_MAX_PIXELS,
            "num_frames": None,
            "fps": 2.0,
            "p_shuffle_frames": 0.0,
            "p_color_jitter": 0.0,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "add_noise": False,
            "sample_type": "uniform",
            "use_tied_data": True,
        },
        "training_args": {"bf16": False, "disable_flash_attn2": True},
        "model_config": {
            "model_name_or_path": str(base),
            "model_revision": "main",
            "output_dim": 1,
            "use_special_tokens": True,
            "freeze_vision_tower": False,
            "freeze_llm": False,
            "tune_merger": True,
            "torch_dtype": dtype,
            "trust_remote_code": False,
            "attn_implementation": None,
            "load_in_8bit": False,
            "load_in_4bit": False,
            "bnb_4bit_quant_type": "nf4",
            "use_bnb_nested_quant": False,
            "reward_token": "special",
            "loss_type": "btt",
        },
        "peft_lora_config": {
            "lora_enable": True,
            "vision_lora": False,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.05,
            "lora_target_modules": None,
            "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
            "lora_modules_to_save": None,
            "lora_task_type": "CAUSAL_LM",
            "use_rslora": False,
            "num_lora_modules": -1,
        },
        "inference_config": {
            f"{d}_{k}": v for d, pair in VIDEOALIGN_CALIBRATION.items() for k, v in zip(("mean", "std"), pair)
        },
    }


def run_videoalign(source: Path, base: Path, work: Path, out: Path) -> dict:
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"
    sys.modules["decord"] = types.SimpleNamespace(VideoReader=_FakeVideoReader)
    sys.path.insert(0, str(source))
    import inference
    import train_reward
    import vision_process
    from data import DataConfig  # noqa: F401  (the reference's own config classes)
    from utils import ModelConfig, PEFTLoraConfig, TrainingConfig

    # flash-attention 2 (what the inference asks for) is CUDA-only: SDPA computes the same attention on the CPU
    original = train_reward.Qwen2VLRewardModelBT.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs["attn_implementation"] = "sdpa"
        return original(cls, *args, **kwargs)

    train_reward.Qwen2VLRewardModelBT.from_pretrained = classmethod(from_pretrained)

    # the tiny release, built the way VideoAlign's training builds the model
    release = work / "VideoReward"
    checkpoint = release / f"checkpoint-{CHECKPOINT_STEP}"
    checkpoint.mkdir(parents=True)
    config = videoalign_model_config(base, "float32")
    (release / "model_config.json").write_text(json.dumps(config, indent=4))
    model, processor, _ = train_reward.create_model_and_processor(
        model_config=ModelConfig(**config["model_config"]),
        peft_lora_config=PEFTLoraConfig(**config["peft_lora_config"]),
        training_args=TrainingConfig(output_dir=str(work / "unused"), disable_flash_attn2=True, bf16=False),
    )
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    round_to_bfloat16_(model)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    torch.save(state, checkpoint / "model.pth")
    processor.tokenizer.save_pretrained(checkpoint / "tokenizer")
    shutil.copy(base / "config.json", release / "config.json")

    # what the fetched frames were after the reference's resize (uint8 levels as float)
    resized = []
    fetch_video = vision_process.fetch_video

    def recording_fetch_video(ele, *args, **kwargs):
        video = fetch_video(ele, *args, **kwargs)
        resized.append(video.clone())
        return video

    vision_process.fetch_video = recording_fetch_video
    videos = common.videoalign_videos()  # [N, F, H, W, 3]
    paths = [f"/in-memory/video_{i}.mp4" for i in range(len(videos))]
    _FakeVideoReader.videos = {f"file://{p}": v for p, v in zip(paths, videos)}
    results = {}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        resized.clear()
        inferencer = inference.VideoVLMRewardInference(str(release), device="cpu", dtype=dtype)
        with torch.no_grad():
            batch = inferencer.prepare_batch(paths, common.PROMPTS)
            raw = inferencer.model(return_dict=True, **batch)["logits"].float()  # [N, 3]
            rewards = inferencer.reward(paths, common.PROMPTS, use_norm=True)
        head_dtype = str(inferencer.model.base_model.model.rm_head.weight.dtype).removeprefix("torch.")
        results[dtype_name] = {
            "raw": raw.tolist(),
            "normalized": [[r["VQ"], r["MQ"], r["TA"]] for r in rewards],
            "overall": [r["Overall"] for r in rewards],
            "head_dtype": head_dtype,
        }
        if dtype_name == "float32":
            results["input_ids_sha256"] = ids_sha256(batch["input_ids"], batch["attention_mask"])
            results["video_grid_thw"] = batch["video_grid_thw"].tolist()
            results["resized_uint8_sha256"] = [tensor_sha256(v.to(torch.uint8)) for v in resized[: len(videos)]]
            results["resized_shape"] = list(resized[0].shape)
            results["pixel_values_videos_sum"] = batch["pixel_values_videos"].double().sum().item()
        del inferencer

    # the fixture: the release without the pickle (its tensors in bfloat16 safetensors), the base model as released
    target = out / "videoalign"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(release, target, ignore=shutil.ignore_patterns("model.pth"))
    config["model_config"]["model_name_or_path"] = RELEASE_BASE_MODEL
    (target / "model_config.json").write_text(json.dumps(config, indent=4) + "\n")
    save_bf16(state, target / f"checkpoint-{CHECKPOINT_STEP}" / "model_pth.safetensors")
    results["videos_sha256"] = common.sha256(videos)
    return results


# ----------------------------------------------------------------------------------------------------------- HPSv3
def run_hpsv3(base: Path, work: Path, out: Path) -> dict:
    import yaml
    from hpsv3 import inference
    from hpsv3.dataset import utils as hps_utils
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml
    from PIL import Image

    # the released inference config with the tiny base, float32 and SDPA
    shipped = Path(inference.__file__).parent / "config" / "HPSv3_7B.yaml"
    settings = yaml.safe_load(shipped.read_text())
    settings.update(model_name_or_path=str(base), torch_dtype="float32", bf16=False, disable_flash_attn2=True,
                    gradient_checkpointing=False, output_dir=str(work / "unused"), report_to="none")  # fmt: skip
    config_path = work / "HPSv3_tiny.yaml"
    config_path.write_text(yaml.safe_dump(settings))

    (_, training_args, model_config, peft_lora_config), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(config_path), is_train=False
    )
    torch.manual_seed(SEED + 2)
    model, _, _ = create_model_and_processor(model_config, peft_lora_config, training_args)
    round_to_bfloat16_(model)
    from safetensors.torch import save_file

    checkpoint = work / "HPSv3.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    del model

    resized = []
    fetch_image = hps_utils.fetch_image

    def recording_fetch_image(ele, *args, **kwargs):
        image = fetch_image(ele, *args, **kwargs)
        resized.append(np.asarray(image).copy())  # [h, w, 3] uint8
        return image

    hps_utils.fetch_image = recording_fetch_image
    inferencer = inference.HPSv3RewardInferencer(config_path=str(config_path), checkpoint_path=str(checkpoint),
                                                 device="cpu")  # fmt: skip
    groups = []
    for videos in common.hpsv3_videos():  # [N, F, H, W, 3]
        resized.clear()
        images = [Image.fromarray(frame) for video in videos for frame in video]
        prompts = [prompt for prompt in common.PROMPTS[: len(videos)] for _ in range(videos.shape[1])]
        with torch.no_grad():
            batch = inferencer.prepare_batch(images, prompts)
            logits = inferencer.model(return_dict=True, **batch)["logits"].float()  # [N * F, 2]
        groups.append({
            "videos_sha256": common.sha256(videos),
            "logits": logits.tolist(),
            "input_ids_sha256": ids_sha256(batch["input_ids"], batch["attention_mask"]),
            "image_grid_thw": batch["image_grid_thw"].tolist(),
            "resized_uint8_sha256": [common.sha256(image.transpose(2, 0, 1)) for image in resized],
            "resized_shape": list(resized[0].shape),
        })  # fmt: skip
    target = out / "hpsv3"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    save_bf16(load_safetensors(checkpoint), target / "HPSv3.safetensors")  # bfloat16 values: cast without change
    return {"groups": groups, "head_dtype": "float32"}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videoalign-src", type=Path, required=True, help="a checkout of KwaiVGI/VideoAlign")
    parser.add_argument("--videoalign-commit", default="unknown")
    parser.add_argument("--out", type=Path, required=True, help="the fixtures folder (tests/fixtures/parity)")
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch folder")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    build_base(base)
    fixture_base = args.out / "base"  # config and tokenizer only: HPSv3's loader reads them as `base_model`
    shutil.rmtree(fixture_base, ignore_errors=True)
    shutil.copytree(base, fixture_base, ignore=shutil.ignore_patterns("*.safetensors", "generation_config.json"))

    videoalign = run_videoalign(args.videoalign_src.resolve(), base, args.work, args.out)
    hpsv3 = run_hpsv3(base, args.work, args.out)
    versions = {name: importlib.metadata.version(name) for name in
                ("torch", "torchvision", "transformers", "tokenizers", "peft", "pillow", "numpy", "hpsv3")}  # fmt: skip
    reference = {
        "generator": "scripts/parity/make_fixtures.py",
        "versions": versions,
        "videoalign_commit": args.videoalign_commit,
        "prompts": common.PROMPTS,
        "videoalign": videoalign,
        "hpsv3": hpsv3,
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(json.dumps(reference["versions"]))  # noqa: T201


if __name__ == "__main__":
    main()
