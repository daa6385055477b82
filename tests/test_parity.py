"""
Parity with the reference implementations: VideoAlign (KwaiVGI/VideoAlign's inference) and HPSv3 (the `hpsv3` wheel's
`HPSv3RewardInferencer`) ran on tiny random models, and `tests/fixtures/parity/reference.json` holds what they
returned. Here our loaders read the same release files and score the same inputs. Regenerate the fixtures with
`python scripts/parity/make_fixtures.py` (a side environment with transformers 4.45; see docs/reward_models.md).

Measured (float32, CPU) against the references: with `reference_exact=True` VideoAlign's raw scores agree within
9e-7 and HPSv3's within 3e-6 (transformers 4.45 vs 5 float rounding), the token ids are the same and the resized
8-bit frames are bit for bit the references'. The default float path differs by 1.3e-3 (VideoAlign raw), 8e-4
(VideoAlign, summed standardised scores) and 3e-3 (HPSv3) on these inputs.
"""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trl_arcopo.rewards.frames import quantize_8bit, resize_bicubic_pil, resize_bicubic_uint8
from trl_arcopo.rewards.hpsv3 import HPSv3Reward
from trl_arcopo.rewards.qwen_vl_inputs import smart_resize
from trl_arcopo.rewards.videoalign import VideoAlignReward


FIXTURES = Path(__file__).parent / "fixtures" / "parity"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
EXACT = 1e-5  # float32, transformers 4.45 vs 5 on the same weights and inputs


def _common():
    """scripts/parity/common.py: the inputs (made bit for bit the same from integer arithmetic) and prompts."""
    path = Path(__file__).parents[1] / "scripts" / "parity" / "common.py"
    spec = importlib.util.spec_from_file_location("parity_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _common()


def _as_videos(array: np.ndarray) -> torch.Tensor:
    """`[N, F, H, W, 3]` uint8 -> `[N, F, 3, H, W]` in `[0, 1]`, as the trainer holds them (k / 255: no rounding)."""
    return torch.from_numpy(array).permute(0, 1, 4, 2, 3).float() / 255


def _ids_sha256(inputs) -> list[str]:
    return [
        hashlib.sha256(ids[mask.bool()].to(torch.int64).numpy().tobytes()).hexdigest()
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])
    ]


def _videoalign_release(folder: Path, dtype: torch.dtype) -> Path:
    """The tiny VideoReward release, with `checkpoint-1/model.pth` (a pickle, so not in the fixtures) in `dtype`."""
    shutil.copytree(FIXTURES / "videoalign", folder)
    tensors = folder / "checkpoint-1" / "model_pth.safetensors"
    torch.save(
        {key: value.to(dtype) for key, value in load_file(tensors).items()}, folder / "checkpoint-1" / "model.pth"
    )
    tensors.unlink()
    return folder


@pytest.fixture(scope="module")
def videoalign_videos():
    assert REFERENCE["prompts"] == common.PROMPTS
    videos = common.videoalign_videos()
    assert common.sha256(videos) == REFERENCE["videoalign"]["videos_sha256"]
    return _as_videos(videos)


@pytest.fixture(scope="module")
def videoalign_float32(tmp_path_factory):
    release = _videoalign_release(tmp_path_factory.mktemp("videoalign") / "VideoReward", torch.float32)
    load = dict(torch_dtype=torch.float32, device="cpu")
    return {exact: VideoAlignReward.from_pretrained(release, reference_exact=exact, **load) for exact in (True, False)}


def test_videoalign_reference_exact_matches_the_reference(videoalign_float32, videoalign_videos):
    reference = REFERENCE["videoalign"]
    reward = videoalign_float32[True]
    assert reward.resample == "uint8" and reward.model.head_dtype == torch.float32  # a float32 checkpoint
    assert reward.fps == 2.0 and reward.max_pixels == common.VIDEOALIGN_MAX_PIXELS  # from model_config.json
    inputs = reward.model_inputs(common.PROMPTS, videoalign_videos)
    assert _ids_sha256(inputs) == reference["input_ids_sha256"]  # the same chat, tokens and placeholder expansion
    assert inputs["video_grid_thw"].tolist() == reference["video_grid_thw"]
    # the frames the reference sampled (2 fps of 8 frames at 16 fps: 0, 2, 5, 7) and resized, bit for bit
    size = smart_resize(*videoalign_videos.shape[-2:], min_pixels=reward.min_pixels, max_pixels=reward.max_pixels)
    assert [4, 3, *size] == reference["resized_shape"]
    frames = videoalign_videos[:, reward.sample_frames(videoalign_videos.shape[1])]
    resized = [
        common.sha256(resize_bicubic_uint8(quantize_8bit(video), size).to(torch.uint8).numpy()) for video in frames
    ]
    assert resized == reference["resized_uint8_sha256"]
    assert inputs["pixel_values_videos"].double().sum().item() == pytest.approx(
        reference["pixel_values_videos_sum"], rel=1e-6
    )
    # the scores: raw head outputs, standardised with the release's calibration, and their sum (measured: 9e-7)
    expected = reference["float32"]
    raw = reward.raw_scores(common.PROMPTS, videoalign_videos)[..., 0]  # [N, 3]
    torch.testing.assert_close(raw, torch.tensor(expected["raw"]), atol=EXACT, rtol=0)
    normalized = (raw - reward.mean) / reward.std  # what `dimension_scores` returns
    torch.testing.assert_close(
        normalized, torch.tensor(expected["normalized"], dtype=torch.float32), atol=EXACT, rtol=0
    )
    assert reward(common.PROMPTS, videoalign_videos) == pytest.approx(expected["overall"], abs=EXACT)


def test_videoalign_float_path_is_close(videoalign_float32, videoalign_videos):
    # the default resizes the float frames (no 8-bit rounding before and after): 1.3e-3 off the raw scores here
    reward = videoalign_float32[False]
    assert reward.resample == "float"
    raw = reward.raw_scores(common.PROMPTS, videoalign_videos)[..., 0]
    difference = (raw - torch.tensor(REFERENCE["videoalign"]["float32"]["raw"])).abs().max().item()
    assert EXACT < difference < 5e-3


def test_videoalign_reference_exact_keeps_a_bfloat16_head(tmp_path, videoalign_videos):
    # a bfloat16 checkpoint (as released): the reference runs its head in bfloat16 too, and so does reference_exact
    release = _videoalign_release(tmp_path / "VideoReward", torch.bfloat16)
    exact = VideoAlignReward.from_pretrained(release, torch_dtype=torch.bfloat16, device="cpu", reference_exact=True)
    assert exact.model.head.weight.dtype == exact.model.head_dtype == torch.bfloat16
    default = VideoAlignReward.from_pretrained(release, torch_dtype=torch.bfloat16, device="cpu")
    assert default.model.head.weight.dtype == torch.float32
    # transformers 4.45's and 5's Qwen2-VL round differently in bfloat16 (up to 4e-2 apart on this model, as far as
    # the reference's own bfloat16 run is from its float32 one), which hides the head's dtype: a sanity bound only
    raw = exact.raw_scores(common.PROMPTS, videoalign_videos)[..., 0]
    expected = REFERENCE["videoalign"]["bfloat16"]
    assert expected["head_dtype"] == "bfloat16"
    torch.testing.assert_close(raw, torch.tensor(expected["raw"]), atol=0.1, rtol=0)


@pytest.fixture(scope="module")
def hpsv3_arrays():
    return common.hpsv3_videos()


@pytest.fixture(scope="module")
def hpsv3_rewards():
    load = dict(base_model=FIXTURES / "base", torch_dtype=torch.float32, device="cpu", frames="uniform", num_frames=2)
    return {
        exact: HPSv3Reward.from_pretrained(FIXTURES / "hpsv3", reference_exact=exact, **load)
        for exact in (True, False)
    }


@pytest.mark.parametrize("group", [0, 1], ids=["480x832-down", "240x416-up"])
def test_hpsv3_reference_exact_matches_the_reference(hpsv3_rewards, hpsv3_arrays, group):
    reference = REFERENCE["hpsv3"]["groups"][group]
    array = hpsv3_arrays[group]
    assert common.sha256(array) == reference["videos_sha256"]
    videos, prompts = _as_videos(array), common.PROMPTS[: len(array)]
    reward = hpsv3_rewards[True]
    assert reward.resample == "pil" and reward.model.head_dtype == torch.float32  # the reference's head is float32
    inputs = reward.model_inputs(prompts, videos)  # each frame an image, with its video's prompt
    assert _ids_sha256(inputs) == reference["input_ids_sha256"]
    assert inputs["image_grid_thw"].tolist() == reference["image_grid_thw"]
    # PIL's 8-bit bicubic resize, reproduced in torch: bit for bit the reference's resized images
    size = smart_resize(*videos.shape[-2:], min_pixels=reward.min_pixels, max_pixels=reward.max_pixels)
    resized = resize_bicubic_pil(quantize_8bit(videos.flatten(0, 1)), size).to(torch.uint8)
    assert [common.sha256(image.numpy()) for image in resized] == reference["resized_uint8_sha256"]
    # (mu, sigma) of every frame (measured: 3e-6 at most), and the reward, the mean of mu over the frames
    expected = torch.tensor(reference["logits"])  # [N * F, 2]
    torch.testing.assert_close(reward.raw_scores(prompts, videos)[:, 0], expected, atol=EXACT, rtol=0)
    mean_mu = expected[:, 0].view(len(array), -1).mean(dim=1)
    assert reward(prompts, videos) == pytest.approx(mean_mu.tolist(), abs=EXACT)


def test_hpsv3_float_path_is_close(hpsv3_rewards, hpsv3_arrays):
    # the default resizes the float frames with torch's kernel (not PIL's 8-bit one): 3e-3 off here
    reward = hpsv3_rewards[False]
    assert reward.resample == "float"
    differences = []
    for array, reference in zip(hpsv3_arrays, REFERENCE["hpsv3"]["groups"]):
        raw = reward.raw_scores(common.PROMPTS[: len(array)], _as_videos(array))[:, 0]
        differences.append((raw - torch.tensor(reference["logits"])).abs().max().item())
    assert EXACT < max(differences) < 1e-2
