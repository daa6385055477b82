"""VideoAlign and HPSv3 rewards on tiny random Qwen2-VL models (offline): preprocessing, calibration, loading."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import ROOT, load_script
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from trl_arcopo.rewards.frames import CLIP_MEAN, CLIP_STD, quantize_8bit, resize_bicubic_pil, resize_bicubic_uint8
from trl_arcopo.rewards.hpsv3 import HPSV3_SPECIAL_TOKEN, HPSv3Reward, hpsv3_prompt
from trl_arcopo.rewards.qwen_vl import QwenVLRewardModel, eight_bit_config, load_reward_model, load_tensors
from trl_arcopo.rewards.qwen_vl_inputs import (
    VIDEO_MIN_PIXELS,
    build_text_inputs,
    chat_text,
    patchify,
    prepare_inputs,
    qwen_vl_frame_indices,
    resize_normalize,
    smart_resize,
)
from trl_arcopo.rewards.videoalign import (
    VIDEOALIGN_CALIBRATION,
    VIDEOALIGN_SPECIAL_TOKENS,
    VideoAlignReward,
    remap_videoalign_state_dict,
    videoalign_prompt,
)
from trl_arcopo.testing_utils import tiny_tokenizer


# Qwen2-VL's chat and vision tokens, then the reward tokens; `<|Reward|>` last, so that a tokenizer without it gets it
# back at the same id when HPSv3's loader adds it.
QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL = [*QWEN_TOKENS, *VIDEOALIGN_SPECIAL_TOKENS, HPSV3_SPECIAL_TOKEN]
PROMPTS = ["a red fox jumps", "a dog in snow", "a blue car at night"]
# the chat template of Qwen2-VL-2B/7B-Instruct's tokenizer, as the parity fixtures use it
QWEN2_VL_CHAT_TEMPLATE = load_script(os.path.join(ROOT, "scripts", "parity", "common.py")).QWEN2_VL_CHAT_TEMPLATE
SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=56 * 84)  # 40x60 frames -> 56x84 (a 4x6 patch grid)
MEAN, STD = torch.tensor([VIDEOALIGN_CALIBRATION[d] for d in ("VQ", "MQ", "TA")]).T  # the release's calibration


def _tokenizer(tokens=SPECIAL):
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": list(tokens)})
    return tokenizer


def _config(tokenizer):
    ids = dict(zip(SPECIAL, tokenizer.convert_tokens_to_ids(SPECIAL)))
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                eos_token_id=None, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                    "rope_theta": 10000.0})  # fmt: skip
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip


def _ranknet_head(seed=2):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))  # fmt: skip


def tiny_reward_model():
    """A tiny Qwen2-VL reward model: its tokenizer, config, backbone (seed 0) and a 1-output head (seed 1)."""
    tokenizer = _tokenizer()
    config = _config(tokenizer)
    torch.manual_seed(0)
    backbone = Qwen2VLForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    head = torch.nn.Linear(64, 1, bias=False)
    return tokenizer, config, backbone, head


@pytest.fixture(scope="module")
def tiny():
    return tiny_reward_model()


@pytest.fixture(scope="module")
def videos():
    return torch.rand(3, 9, 3, 40, 60, generator=torch.Generator().manual_seed(1))


def _videoalign(tiny, head=None, positions="sequential", **kwargs):
    tokenizer, _, backbone, default_head = tiny
    ids = tokenizer.convert_tokens_to_ids(list(VIDEOALIGN_SPECIAL_TOKENS))
    model = QwenVLRewardModel(backbone, head or default_head, ids, positions=positions)
    return VideoAlignReward(model, tokenizer, **{**SMALL, "batch_size": 2, **kwargs})


def _hpsv3(tiny, **kwargs):
    tokenizer, _, backbone, _ = tiny
    model = QwenVLRewardModel(backbone, _ranknet_head(), tokenizer.convert_tokens_to_ids([HPSV3_SPECIAL_TOKEN]))
    return HPSv3Reward(model, tokenizer, **{**SMALL, "batch_size": 4, **kwargs})


# ---------------------------------------------------------------------------------------------------- preprocessing
def test_videoalign_preprocessing_of_a_wan_video(tiny):
    # 81 frames at 16 fps, sampled at 2 fps: 81 / 16 * 2 = 10.125 frames, rounded to a multiple of 2 -> 10, spread
    # over [0, 80] by linspace (step 80 / 9 = 8.89) and rounded.
    assert qwen_vl_frame_indices(81, video_fps=16, fps=2) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    # 480x832 rounds to 476x840 (multiples of 28) = 399,840 pixels > 448 * 448 = 200,704, so both sides shrink by
    # sqrt(480 * 832 / 200,704) = 1.4106 and round down to multiples of 28: 340.3 -> 336, 589.8 -> 588.
    assert smart_resize(480, 832, min_pixels=VIDEO_MIN_PIXELS, max_pixels=448 * 448) == (336, 588)
    # the grid: 10 frames / temporal patch 2 = 5, 336 / 14 = 24, 588 / 14 = 42; tokens = 5 * 24 * 42 / 2² = 1260
    reward = _videoalign(tiny, min_pixels=VIDEO_MIN_PIXELS, max_pixels=448 * 448, fps=2, video_fps=16)
    assert reward.sample_frames(81) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    video = torch.full((1, 1, 3, 480, 832), 0.5).expand(1, 81, 3, 480, 832)  # a view: no 81-frame allocation
    inputs = reward.model_inputs(PROMPTS[:1], video)
    assert inputs["video_grid_thw"].tolist() == [[5, 24, 42]]
    assert inputs["pixel_values_videos"].shape == (5 * 24 * 42, 3 * 2 * 14 * 14)
    assert (inputs["input_ids"] == tiny[0].convert_tokens_to_ids("<|video_pad|>")).sum() == 1260
    # HPSv3 sizes each frame to about 256 tokens: min = max = 200,704 pixels gives the same 336x588, one image each
    assert smart_resize(480, 832, min_pixels=256 * 28 * 28, max_pixels=256 * 28 * 28) == (336, 588)


def test_fps_sampling_of_short_videos():
    assert qwen_vl_frame_indices(9, video_fps=16, fps=2) == [
        0,
        3,
        5,
        8,
    ]  # 1.125 frames -> at least 4: linspace(0, 8, 4)
    assert qwen_vl_frame_indices(3, video_fps=16, fps=2) == [0, 2]  # at most the frames there are, a multiple of 2
    with pytest.raises(ValueError, match="A video of 1 frames is too short"):
        qwen_vl_frame_indices(1)


def test_patchify_matches_the_transformers_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(0))  # already a multiple of 28
    pixels, grid = patchify(resize_normalize(image[None], (56, 84))[:, None])  # [1, T=1, 3, 56, 84]
    expected = Qwen2VLImageProcessorPil()(
        images=[image.numpy()], do_resize=False, do_rescale=False, input_data_format="channels_first",
        return_tensors="pt",
    )  # fmt: skip
    assert grid.tolist() == expected["image_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "size, out",
    [((480, 832), (336, 588)), ((240, 416), (364, 616)), ((37, 53), (20, 70)), ((100, 100), (100, 57)),
     ((53, 37), (70, 20)), ((40, 40), (80, 20)), ((40, 40), (20, 80))],
)  # fmt: skip
def test_pil_bicubic_resize_is_pils_bit_for_bit(size, out):
    # HPSv3's reference resizes 8-bit images with PIL: reproduced in torch (fixed point, 8 bits after each pass), in
    # the installed Pillow's pass order (Pillow 13 goes vertically first when the height shrinks and the width grows)
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)  # white noise: the hardest case
    expected = np.asarray(Image.fromarray(image).resize(out[::-1], Image.BICUBIC))
    levels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    assert np.array_equal(resize_bicubic_pil(levels, out)[0].permute(1, 2, 0).numpy(), expected)


def test_resize_modes():
    frames = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(0))
    levels = {}
    for mode in ("float", "uint8", "pil"):
        normalised = resize_normalize(frames, (56, 84), resample=mode)
        std, mean = torch.tensor(CLIP_STD).view(3, 1, 1), torch.tensor(CLIP_MEAN).view(3, 1, 1)
        levels[mode] = (normalised * std + mean) * 255
    for mode in ("uint8", "pil"):  # 8-bit levels, within a level or so of the float resize
        assert torch.allclose(levels[mode], levels[mode].round(), atol=1e-3)
        assert (levels[mode] - levels["float"].clamp(0, 255)).abs().mean() < 1
    assert torch.allclose(levels["uint8"], resize_bicubic_uint8(quantize_8bit(frames), (56, 84)), atol=1e-3)
    with pytest.raises(ValueError, match="`resample='nearest'` must be one of"):
        resize_normalize(frames, (56, 84), resample="nearest")


def test_video_patch_layout_by_hand():
    # a value that encodes where it comes from: frame t, channel c, row y, column x
    t, c, y, x = torch.meshgrid(torch.arange(3), torch.arange(3), torch.arange(56), torch.arange(56), indexing="ij")
    video = (t * 1_000_000 + c * 10_000 + y * 100 + x).double()[None]  # [1, 3 frames, 3, 56, 56]
    pixels, grid = patchify(video)
    assert grid.tolist() == [[2, 4, 4]]  # 3 frames padded to 4 (the last repeated): 2 temporal patches
    # rows run over (temporal patch, merged row, merged column, row in the 2x2 merge, column in it), columns over
    # (channel, frame in the temporal patch, y in the 14x14 patch, x in it)
    tt, bh, bw, mh, mw = (i.flatten() for i in torch.meshgrid(*[torch.arange(2)] * 5, indexing="ij"))
    cc, ti, py, px = (i.flatten() for i in torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(14),
                                                          torch.arange(14), indexing="ij"))  # fmt: skip
    frame = (tt[:, None] * 2 + ti[None]).clamp(max=2)  # frame 3 is the copy of frame 2
    row = (bh * 2 + mh)[:, None] * 14 + py[None]
    col = (bw * 2 + mw)[:, None] * 14 + px[None]
    expected = frame * 1_000_000 + cc[None] * 10_000 + row * 100 + col
    assert pixels.shape == (32, 3 * 2 * 14 * 14) and torch.equal(pixels, expected.double())


def test_text_inputs_expand_the_placeholder(tiny):
    tokenizer = tiny[0]
    for media in ("image", "video"):  # the chat is what Qwen2-VL's template renders
        messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": "a {x} fox\nEND\n"}]}]
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert rendered == chat_text("a {x} fox\nEND\n", media)
    texts = ["a cat", "a red fox jumps over the dog"]
    inputs = build_text_inputs(tokenizer, texts, "video", 6)
    pad_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for i, text in enumerate(texts):  # the same ids as tokenising the text with the placeholder repeated
        expanded = chat_text(text, "video").replace("<|video_pad|>", "<|video_pad|>" * 6)
        ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
        assert inputs["input_ids"][i, : len(ids)].tolist() == ids
        assert inputs["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (inputs["input_ids"].shape[1] - len(ids))
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # right padding
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == pad_id).long() * 2)
    assert (inputs["mm_token_type_ids"] == 2).sum(dim=1).tolist() == [6, 6]
    with pytest.raises(ValueError, match="must not contain '<\\|video_pad\\|>' itself"):
        build_text_inputs(tokenizer, ["a <|video_pad|> cat"], "video", 6)


def test_prompts_are_the_trained_ones():
    # sha256 of the reference texts (VideoAlign's "detailed_special" template; HPSv3's INSTRUCTION + the reward line)
    assert hashlib.sha256(videoalign_prompt("{text_prompt}").encode()).hexdigest() == (
        "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    )
    assert hashlib.sha256(hpsv3_prompt("{text_prompt}").encode()).hexdigest() == (
        "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
    )
    assert "Textual prompt - a {braced} prompt\n" in videoalign_prompt("a {braced} prompt")


# ------------------------------------------------------------------------------------------------------ VideoAlign
def _last_hidden_by_hand(backbone, inputs):
    """The backbone's last hidden states `[L, D]` of one prepared input, with positions 0, 1, 2, ... (as trained)."""
    extra = {
        k: inputs[k]
        for k in ("video_grid_thw", "pixel_values_videos", "image_grid_thw", "pixel_values")
        if k in inputs
    }
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    return backbone.model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=positions, **extra
    ).last_hidden_state[0]


def test_videoalign_calibration_aggregation_and_invariances(tiny, videos):
    tokenizer, _, backbone, head = tiny
    reward = _videoalign(tiny)
    scores = reward(PROMPTS, videos)
    assert reward.__name__ == "videoalign" and len(scores) == 3 and all(map(torch.isfinite, torch.tensor(scores)))
    assert reward(PROMPTS, videos) == scores  # deterministic
    alone = [reward(PROMPTS[i : i + 1], videos[i : i + 1])[0] for i in range(3)]
    assert scores == pytest.approx(alone, abs=1e-5)  # batch mates (and padding) change nothing
    # by hand, video 1: frames [0, 3, 5, 8] (2 fps of 9 frames at 16 fps), the backbone with positions 0, 1, 2, ...,
    # the head at each reward token, standardised with the release's mean and std, summed
    inputs = prepare_inputs(tokenizer, videos[1:2, [0, 3, 5, 8]], [videoalign_prompt(PROMPTS[1])], "video", **SMALL)
    with torch.no_grad():
        hidden = _last_hidden_by_hand(backbone, inputs)
        ids = inputs["input_ids"][0].tolist()
        raw = torch.stack(
            [head(hidden[ids.index(t)])[0] for t in tokenizer.convert_tokens_to_ids(list(VIDEOALIGN_SPECIAL_TOKENS))]
        )
    by_hand = (raw - MEAN) / STD  # [VQ, MQ, TA]
    assert scores[1] == pytest.approx(by_hand.sum().item(), abs=1e-5)
    assert reward.dimension_scores(PROMPTS[1:2], videos[1:2])[0].tolist() == pytest.approx(by_hand.tolist(), abs=1e-5)
    # one dimension, or the raw scores
    mq = _videoalign(tiny, dimensions="MQ")
    assert mq.__name__ == "videoalign_mq" and mq(PROMPTS[1:2], videos[1:2])[0] == pytest.approx(
        by_hand[1].item(), abs=1e-5
    )
    raw_sum = _videoalign(tiny, dimensions=("VQ", "TA"), normalize=False)(PROMPTS[1:2], videos[1:2])[0]
    assert raw_sum == pytest.approx((raw[0] + raw[2]).item(), abs=1e-5)


def test_reference_exact_switches_the_resize_only(tiny, videos):
    hpsv3_first = lambda tiny, **kwargs: _hpsv3(tiny, frames="first", **kwargs)  # noqa: E731
    same_size = torch.round(torch.rand(1, 4, 3, 56, 84, generator=torch.Generator().manual_seed(2)) * 255) / 255
    for make, mode in ((_videoalign, "uint8"), (hpsv3_first, "pil")):
        default, exact = make(tiny), make(tiny, reference_exact=True)
        assert (default.resample, exact.resample) == ("float", mode) and not default.reference_exact
        # 40x60 frames upscaled to 56x84: rounding to 8 bits (and PIL's kernel) moves the scores a little
        rounded, unrounded = exact(PROMPTS[:1], videos[:1, :4]), default(PROMPTS[:1], videos[:1, :4])
        assert rounded == pytest.approx(unrounded, abs=1e-2) and rounded != unrounded
        # 8-bit frames (k / 255) already of their model size: nothing is resized or rounded, the two agree
        assert exact(PROMPTS[:1], same_size) == pytest.approx(default(PROMPTS[:1], same_size), abs=1e-6)


def test_videoalign_three_column_head_reads_the_diagonal(tiny, videos):
    torch.manual_seed(3)
    reward = _videoalign(tiny, head=torch.nn.Linear(64, 3, bias=False))
    raw = reward.raw_scores(PROMPTS[:2], videos[:2])  # [2, 3 tokens, 3 columns]
    expected = (raw.diagonal(dim1=1, dim2=2) - MEAN) / STD
    assert torch.allclose(reward.dimension_scores(PROMPTS[:2], videos[:2]), expected)


def test_mrope_positions(tiny, videos):
    _, _, backbone, head = tiny
    reward = _videoalign(tiny, positions="mrope")
    scores = reward(PROMPTS, videos)
    assert scores == pytest.approx([reward(PROMPTS[i : i + 1], videos[i : i + 1])[0] for i in range(3)], abs=1e-5)
    inputs = reward.model_inputs(PROMPTS[:1], videos[:1])
    with torch.no_grad():  # Qwen2-VL's own 3-D positions, which need `mm_token_type_ids`
        hidden = backbone.model(**inputs).last_hidden_state
    assert torch.allclose(
        reward.model(**inputs), head(hidden[:, reward.model.reward_positions(inputs["input_ids"])[0]])
    )
    assert abs(scores[0] - _videoalign(tiny)(PROMPTS[:1], videos[:1])[0]) > 1e-6  # not the sequential positions


def test_videoalign_refuses_bad_input(tiny, videos):
    with pytest.raises(ValueError, match="must be distinct names among"):
        _videoalign(tiny, dimensions=("VQ", "AQ"))
    with pytest.raises(ValueError, match="must be positive"):
        _videoalign(tiny, fps=0)
    reward = _videoalign(tiny)
    with pytest.raises(ValueError, match=r"must be \[N, F, 3, H, W\]"):
        reward(PROMPTS[:1], videos[:1, :, :1])
    with pytest.raises(ValueError, match="Got 2 prompts for 1 videos"):
        reward(PROMPTS[:2], videos[:1])
    with pytest.raises(ValueError, match="exactly once"):
        reward(["a <|VQ_reward|> fox"], videos[:1])
    with pytest.raises(ValueError, match="use the tokenizer of the checkpoint"):
        VideoAlignReward(_hpsv3(tiny).model, tiny[0])


# ----------------------------------------------------------------------------------------------------------- HPSv3
def test_hpsv3_mean_over_frames_and_invariances(tiny, videos):
    tokenizer, _, backbone, _ = tiny
    reward = _hpsv3(tiny, frames="uniform", num_frames=3)  # frames 0, 4, 8
    scores = reward(PROMPTS, videos)
    assert reward.__name__ == "hpsv3" and len(scores) == 3 and all(map(torch.isfinite, torch.tensor(scores)))
    assert reward(PROMPTS, videos) == scores
    alone = [reward(PROMPTS[i : i + 1], videos[i : i + 1])[0] for i in range(3)]
    assert scores == pytest.approx(alone, abs=1e-5)
    per_frame = reward.frame_scores(PROMPTS, videos)  # [3 videos, 3 frames]
    assert per_frame.shape == (3, 3) and scores == pytest.approx(per_frame.mean(dim=1).tolist(), abs=1e-6)
    # by hand, frame 4 of video 0 as an image: the head's first output (the mean) at <|Reward|>
    inputs = prepare_inputs(tokenizer, videos[0:1, 4:5], [hpsv3_prompt(PROMPTS[0])], "image", **SMALL)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    with torch.no_grad():
        hidden = _last_hidden_by_hand(backbone, inputs)
        at = inputs["input_ids"][0].tolist().index(tokenizer.convert_tokens_to_ids(HPSV3_SPECIAL_TOKEN))
        mu = _ranknet_head().eval()(hidden[at])[0]
    assert per_frame[0, 1].item() == pytest.approx(mu.item(), abs=1e-5)
    first = _hpsv3(tiny, frames="first")
    assert first(PROMPTS[:1], videos[:1, 4:])[0] == pytest.approx(mu.item(), abs=1e-5)
    with pytest.raises(ValueError, match="is not a frame policy"):
        _hpsv3(tiny, frames="middle")


# --------------------------------------------------------------------------------------------------------- loading
def _old_key(key):
    """transformers 5 -> transformers 4.45 names (the releases')."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return "model." + key.removeprefix("model.language_model.") if key.startswith("model.language_model.") else key


def _peft_release(backbone, head, rank=4, seed=3):
    """A state dict laid out like VideoReward's `model.pth`: the PEFT-wrapped model, LoRA on the language model."""
    generator = torch.Generator().manual_seed(seed)
    release = {}
    for key, value in backbone.state_dict().items():
        module, _, leaf = _old_key(key).rpartition(".")
        if re.search(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$", module):
            release[f"base_model.model.{module}.base_layer.{leaf}"] = value.clone()
            if leaf == "weight":
                a = torch.randn(rank, value.shape[1], generator=generator) * 0.1
                b = torch.randn(value.shape[0], rank, generator=generator) * 0.1
                release[f"base_model.model.{module}.lora_A.default.weight"] = a
                release[f"base_model.model.{module}.lora_B.default.weight"] = b
        else:
            release[f"base_model.model.{module}.{leaf}"] = value.clone()
    release["base_model.model.rm_head.weight"] = head.weight.clone()
    return release


def test_remap_and_lora_merge_of_a_release_shaped_state_dict(tiny):
    _, _, backbone, head = tiny
    release = _peft_release(backbone, head)
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight" in release
    assert (
        "base_model.model.visual.blocks.0.attn.qkv.weight" in release and "base_model.model.lm_head.weight" in release
    )
    remapped = remap_videoalign_state_dict(release, lora_scale=2.0)
    assert set(remapped) == set(backbone.state_dict()) | {"head.weight"}  # nothing missing, nothing unexpected
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = release[f"{prefix}.lora_A.default.weight"], release[f"{prefix}.lora_B.default.weight"]
    expected = release[f"{prefix}.base_layer.weight"] + 2.0 * b @ a
    assert torch.allclose(remapped["model.language_model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert torch.equal(
        remapped["model.language_model.layers.0.self_attn.q_proj.bias"], release[f"{prefix}.base_layer.bias"]
    )
    assert torch.equal(remapped["model.visual.merger.mlp.0.weight"], backbone.model.visual.merger.mlp[0].weight)
    # PEFT's adapter files: `lora_A.weight` (no adapter name) next to the plain base weight merge the same way
    adapter = {f"model.layers.0.self_attn.q_proj.lora_{x}.weight": t for x, t in (("A", a), ("B", b))}
    adapter["model.layers.0.self_attn.q_proj.weight"] = release[f"{prefix}.base_layer.weight"]
    merged = remap_videoalign_state_dict(adapter, lora_scale=2.0)
    assert torch.allclose(merged["model.language_model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="not its partner"):
        remap_videoalign_state_dict({k: v for k, v in release.items() if "q_proj.lora_B" not in k})


def _merged_backbone(config, remapped):
    backbone = Qwen2VLForConditionalGeneration(config).eval()
    backbone.load_state_dict({k: v for k, v in remapped.items() if not k.startswith("head.")})
    return backbone


def test_videoalign_from_pretrained_reads_the_release_layout(tiny, videos, tmp_path):
    tokenizer, config, backbone, head = tiny
    release = _peft_release(backbone, head)
    (tmp_path / "checkpoint-3").mkdir()  # an older step, not used
    (tmp_path / "checkpoint-12").mkdir()
    torch.save(release, tmp_path / "checkpoint-12" / "model.pth")
    tokenizer.save_pretrained(tmp_path / "checkpoint-12" / "tokenizer")
    config.save_pretrained(tmp_path)
    calibration = {"VQ": (1.0, 2.0), "MQ": (0.5, 1.5), "TA": (-1.0, 4.0)}
    (tmp_path / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 4.0, "max_frame_pixels": 56 * 84, "eval_dim": ["VQ", "MQ", "TA"], "num_frames": None,
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1, "reward_token": "special",
                         "use_special_tokens": True},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": {f"{d}_{k}": v for d, pair in calibration.items() for k, v in zip(("mean", "std"), pair)},
    }))  # fmt: skip
    loaded = VideoAlignReward.from_pretrained(
        tmp_path, torch_dtype=torch.float32, device="cpu", min_pixels=4 * 28 * 28
    )
    assert loaded.fps == 4.0 and loaded.max_pixels == 56 * 84
    assert loaded.mean.tolist() == [1.0, 0.5, -1.0] and loaded.std.tolist() == [2.0, 1.5, 4.0]
    # the same scores as the in-memory model with the LoRA (alpha / r = 2) merged by hand
    merged = _merged_backbone(config, remap_videoalign_state_dict(release, lora_scale=2.0))
    ids = tokenizer.convert_tokens_to_ids(list(VIDEOALIGN_SPECIAL_TOKENS))
    expected = VideoAlignReward(
        QwenVLRewardModel(merged, head, ids), tokenizer, fps=4.0, calibration=calibration, **SMALL
    )
    assert loaded(PROMPTS, videos) == pytest.approx(expected(PROMPTS, videos), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="has no `model_config.json`"):
        VideoAlignReward.from_pretrained(tmp_path / "checkpoint-3" / "nowhere", device="cpu")


def test_hpsv3_from_pretrained_reads_the_release_layout(tiny, videos, tmp_path):
    from safetensors.torch import save_file

    tokenizer, config, backbone, _ = tiny
    head = _ranknet_head()
    # HPSv3.safetensors: the reward model's state dict, transformers 4.45 names (`visual.*`, `model.*`, `rm_head.*`)
    state = {_old_key(k): v.clone().contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()})
    save_file(state, tmp_path / "HPSv3.safetensors")
    base = tmp_path / "base"  # Qwen2-VL's config and tokenizer, without <|Reward|>: the loader adds it
    config.save_pretrained(base)
    _tokenizer(SPECIAL[:-1]).save_pretrained(base)
    loaded = HPSv3Reward.from_pretrained(tmp_path, torch_dtype=torch.float32, device="cpu", base_model=base,
                                         num_frames=2, **SMALL)  # fmt: skip
    assert loaded.tokenizer.convert_tokens_to_ids(HPSV3_SPECIAL_TOKEN) == tokenizer.convert_tokens_to_ids(
        HPSV3_SPECIAL_TOKEN
    )
    expected = _hpsv3(tiny, num_frames=2)
    assert loaded(PROMPTS, videos) == pytest.approx(expected(PROMPTS, videos), abs=1e-5)


def test_loading_reads_tensors_only_and_names_the_8bit_install(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"rm_head.weight": Payload()}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        load_tensors(tmp_path / "model.pth")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(
        ImportError, match=r"`load_in_8bit=True` needs bitsandbytes.*pip install \"trl_arcopo\[rewards\]\""
    ):
        eight_bit_config()


def test_load_in_8bit(tiny, videos):
    pytest.importorskip("bitsandbytes")
    tokenizer, _, backbone, head = tiny
    state = {**backbone.state_dict(), "head.weight": head.weight}
    ids = tokenizer.convert_tokens_to_ids(list(VIDEOALIGN_SPECIAL_TOKENS))
    model = load_reward_model(
        state, _config(tokenizer), ids, torch_dtype=torch.bfloat16, device="cpu", load_in_8bit=True
    )
    assert model.core.language_model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert model.head.weight.dtype == torch.float32  # the head is not quantised
    scores = VideoAlignReward(model, tokenizer, **SMALL)(PROMPTS[:2], videos[:2])
    assert scores == pytest.approx(_videoalign(tiny)(PROMPTS[:2], videos[:2]), rel=0.05)


# ------------------------------------------------------------------------------------------------ real checkpoints
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VIDEOALIGN_PATH"), reason="set VIDEOALIGN_PATH to the VideoReward release")
def test_real_videoalign_checkpoint():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = VideoAlignReward.from_pretrained(os.environ["VIDEOALIGN_PATH"], device=device,
                                              base_model=os.environ.get("VIDEOALIGN_BASE_MODEL"))  # fmt: skip
    if reward.tokenizer.chat_template:  # our rendering of the chat equals the tokenizer's own template
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
        assert reward.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat_text(
            "hi", "video"
        )
    videos = torch.rand(2, 33, 3, 240, 416, generator=torch.Generator().manual_seed(0))
    scores = reward.dimension_scores(["a red fox jumps over a fence"] * 2, videos)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HPSV3_PATH"), reason="set HPSV3_PATH to HPSv3.safetensors")
def test_real_hpsv3_checkpoint():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = os.environ.get("HPSV3_BASE_MODEL", "Qwen/Qwen2-VL-7B-Instruct")
    reward = HPSv3Reward.from_pretrained(os.environ["HPSV3_PATH"], device=device, base_model=base, num_frames=2)
    scores = reward(["a red fox jumps over a fence"] * 2, torch.rand(2, 9, 3, 240, 416))
    assert len(scores) == 2 and all(map(torch.isfinite, torch.tensor(scores)))
