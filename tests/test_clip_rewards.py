"""CLIP-family rewards on a tiny random `CLIPModel` (offline): preprocessing, frame policy, calibration, invariances."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from trl_arcopo.rewards import CLIPScoreReward
from trl_arcopo.rewards.frames import (
    CLIP_MEAN,
    CLIP_STD,
    frame_indices,
    normalize,
    resize_bicubic,
    resize_bicubic_pil,
    resize_center_crop,
    shortest_edge_size,
)
from trl_arcopo.testing_utils import tiny_tokenizer


def _tiny_clip():
    tokenizer = tiny_tokenizer()
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), tokenizer


PROMPTS = ["a red fox jumps", "a dog in snow", "a blue car at night"]


def test_frame_policies():
    assert frame_indices(81, "first") == [0]
    assert frame_indices(81, "uniform", k=5) == [0, 20, 40, 60, 80]
    assert frame_indices(3, "uniform", k=5) == [0, 1, 2]
    assert frame_indices(16, "fps", fps=2, video_fps=16) == [0, 8]
    with pytest.raises(ValueError, match="`frames='random'` is not a frame policy"):
        frame_indices(8, "random")
    with pytest.raises(ValueError, match="`fps=None` must be in"):
        frame_indices(8, "fps")


def test_resize_center_crop_sizes_and_normalisation():
    images = torch.full((2, 3, 48, 64), 0.5)
    out = resize_center_crop(images, 32)
    assert out.shape == (2, 3, 32, 32)  # short side 48 -> 32, width 64 -> int(32 * 64 / 48) = 42, then the center 32
    assert shortest_edge_size(48, 64, 32) == (32, 42) and shortest_edge_size(64, 48, 32) == (42, 32)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[0, :, 5, 7], expected, atol=1e-5)


def _smooth_frame(height, width, seed=0):
    """An 8-bit RGB frame `[H, W, 3]` of smooth colour waves with a little noise (natural-image-like frequencies)."""
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 8, waves.shape)
    return np.clip(waves + noise, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("height, width", [(480, 854), (480, 832)])
def test_resize_center_crop_matches_the_transformers_clip_processor(height, width):
    # transformers' CLIPImageProcessor (here its PIL backend; the torchvision one is the same rule) resizes the short
    # side to 224 and truncates the long side: 480x854 -> 224x398 (398.53; rounding gave 399 and shifted the crop)
    processor_module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    frame = _smooth_frame(height, width)
    expected = torch.from_numpy(
        processor_module.CLIPImageProcessorPil()(images=[frame], return_tensors="np")["pixel_values"]
    )
    levels = torch.from_numpy(frame).permute(2, 0, 1)[None].float()  # [1, 3, H, W] in 0..255
    new_h, new_w = shortest_edge_size(height, width, 224)
    assert (new_h, new_w) == (224, int(224 * width / height)) and new_w == {854: 398, 832: 388}[width]
    # the same size and crop: with PIL's 8-bit bicubic (reproduced in torch) in place of torch's, the output is equal
    pil = resize_bicubic_pil(levels, (new_h, new_w)) / 255
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    torch.testing.assert_close(
        normalize(pil[..., top : top + 224, left : left + 224], CLIP_MEAN, CLIP_STD), expected, atol=1e-6, rtol=0
    )
    # ours differs only by the kernel: torch's float bicubic vs PIL's 8-bit one on the same 224xW grid. Measured on
    # these frames: 0.0040 at most in [0, 1] (about one 8-bit level, PIL's rounding), so 0.015 at most and 0.004 on
    # average after the normalisation (/ std ~0.27). On white noise it reaches 0.06-0.12 (PIL clips its 8-bit
    # intermediate image). The rounded size of before was off by up to 0.23 here (the crop one pixel off).
    kernel_only = (resize_bicubic(levels / 255, (new_h, new_w)).clamp(0, 1) - pil).abs().max().item()
    assert kernel_only < 1.1 / 255
    ours = resize_center_crop(levels / 255, 224)
    assert (ours - expected).abs().max().item() <= kernel_only / min(CLIP_STD) + 1e-5
    assert (ours - expected).abs().mean().item() < 0.005


def test_clip_score_calibration_aggregation_and_invariances():
    model, tokenizer = _tiny_clip()
    videos = torch.rand(3, 9, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    reward = CLIPScoreReward(model, tokenizer, frames="uniform", num_frames=3)
    scores = reward(PROMPTS, videos)
    assert len(scores) == 3 and all(-1 <= s <= 1 for s in scores)
    assert reward(PROMPTS, videos) == scores  # deterministic
    alone = [reward(PROMPTS[i : i + 1], videos[i : i + 1])[0] for i in range(3)]
    assert scores == pytest.approx(alone, abs=1e-5)  # a video's score does not depend on its batch mates
    # aggregation: the mean of the per-frame scores of the selected frames 0, 4 and 8
    first = CLIPScoreReward(model, tokenizer, frames="first")
    per_frame = [first(PROMPTS, videos[:, j : j + 1]) for j in (0, 4, 8)]
    assert scores == pytest.approx([sum(f[i] for f in per_frame) / 3 for i in range(3)], abs=1e-5)
    # a hand-computed value: the cosine of the normalised embeddings of frame 0, by the model's own calls
    pixels = resize_center_crop(videos[:1, 0], 32)
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(
            model.get_text_features(**tokenizer(PROMPTS[:1], return_tensors="pt")).pooler_output, dim=-1
        )
    assert first(PROMPTS[:1], videos[:1])[0] == pytest.approx((image * text).sum().item(), abs=1e-5)
    # PickScore's calibration: the model's logit scale
    pick = CLIPScoreReward(model, tokenizer, frames="uniform", num_frames=3, use_logit_scale=True)
    assert pick.__name__ == "pick_score"
    assert pick(PROMPTS, videos) == pytest.approx([s * model.logit_scale.exp().item() for s in scores], rel=1e-5)


def test_clip_score_refuses_bad_input():
    model, tokenizer = _tiny_clip()
    with pytest.raises(ValueError, match="is not a frame policy"):
        CLIPScoreReward(model, tokenizer, frames="middle")
    with pytest.raises(ValueError, match=r"must be \[N, F, 3, H, W\]"):
        CLIPScoreReward(model, tokenizer)(["a"], torch.rand(1, 2, 1, 32, 32))


def test_aesthetic_head_on_clip_embeddings_and_safe_loading(tmp_path):
    from trl_arcopo.rewards import AestheticReward, load_aesthetic_head
    from trl_arcopo.rewards.clip import AestheticMLP

    model, _ = _tiny_clip()
    torch.manual_seed(2)
    head = AestheticMLP(embedding_dim=16)
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)  # the released file's layout: a plain state dict
    loaded = load_aesthetic_head(path)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))

    videos = torch.rand(3, 9, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    reward = AestheticReward(model, loaded, frames="uniform", num_frames=3, scale=0.1)
    scores = reward(PROMPTS, videos)
    alone = [reward(PROMPTS[i : i + 1], videos[i : i + 1])[0] for i in range(3)]
    assert scores == pytest.approx(alone, abs=1e-5) and reward(PROMPTS, videos) == scores
    # hand-computed: the head on the normalised embeddings of frames 0, 4, 8, averaged, times 0.1
    with torch.no_grad():
        pixels = resize_center_crop(videos[0, [0, 4, 8]], 32)
        embeddings = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        expected = head.eval()(embeddings).mean().item() * 0.1
    assert scores[0] == pytest.approx(expected, abs=1e-6)

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    crafted = tmp_path / "crafted.pth"
    torch.save({"layers.0.weight": Payload()}, crafted)
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        load_aesthetic_head(crafted)
