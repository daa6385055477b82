import pytest
import torch

from trl_arcopo.models import FramePackingAutoencoder
from trl_arcopo.shapes import COLOURS, evaluate_generator, generate_videos, paired_difference, score_videos
from trl_arcopo.shapes.pretrained import load_pretrained_pipeline
from trl_arcopo.testing_utils import tiny_pipeline


def test_load_pipeline_from_a_pretraining_folder(tmp_path):
    source = tiny_pipeline()
    source.save_pretrained(tmp_path)
    pipe = load_pretrained_pipeline(str(tmp_path))
    a = source("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    b = pipe("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert torch.equal(a, b)


def test_missing_pipeline_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain.py"):
        load_pretrained_pipeline(str(tmp_path / "nowhere"))


def test_shipped_model_loads_offline_and_draws_the_prompted_colour_and_motion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pretrained_pipeline()  # the folder inside the package: no network, no download
    assert isinstance(pipe.vae, FramePackingAutoencoder) and pipe.config.default_sampler == "ode"
    assert pipe.config.default_num_frames_per_chunk == 1  # one packed latent frame = one chunk of 3 frames
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 5_000_000
    prompts = [f"a {colour} square moving right" for colour in COLOURS]
    videos = generate_videos(pipe, prompts, seeds=list(range(len(prompts))))  # [6, 12, 3, 32, 32]
    assert videos.shape == (6, 12, 3, 32, 32) and videos.min() >= 0 and videos.max() <= 1
    assert torch.equal(videos, generate_videos(pipe, prompts, seeds=list(range(len(prompts)))))
    # a trained model, not noise: most videos show one object of the prompted colour, moving the prompted way
    scores = score_videos(prompts, videos)
    assert scores["colour"].mean() >= 0.5, scores["colour"]
    assert scores["direction"].mean() >= 0.5, scores["direction"]


def test_evaluation_seed_sets_and_paired_difference():
    pipe = load_pretrained_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red square moving left", "a blue circle moving up"]
    result = evaluate_generator(pipe, prompts, num_seeds=2, seed=3)
    combined = result["combined"]
    by_seed = torch.tensor(combined["by_seed"])  # the mean of each seed set of 2 videos
    assert by_seed.shape == (2,)
    assert combined["mean"] == pytest.approx(by_seed.mean().item(), abs=1e-6)
    assert combined["std"] == pytest.approx(by_seed.std().item(), abs=1e-6)
    # within-prompt spread: with 2 seeds per prompt, the std of a pair is |a - b| / sqrt(2); seed set s gives prompt i
    # the seed 3 * 100_003 + s * 1009 + i
    seeds = [3 * 100_003 + s * 1009 + i for s in range(2) for i in range(2)]
    preference = score_videos(prompts * 2, generate_videos(pipe, prompts * 2, seeds))["prominence"].view(2, 2)
    expected = ((preference[0] - preference[1]).abs() / 2**0.5).mean().item()
    assert result["prominence"]["within_prompt_std"] == pytest.approx(expected, abs=1e-6)
    # the same seeds give the same videos, so a model compared with itself differs by exactly 0 in every seed set
    again = evaluate_generator(pipe, prompts, num_seeds=2, seed=3)
    assert paired_difference(result, again) == {
        "mean": 0.0,
        "std": 0.0,
        "base_spread": combined["std"],
        "by_seed": [0.0, 0.0],
    }
    shifted = {
        "combined": {"mean": 0.0, "std": 0.0, "by_seed": [v + d for v, d in zip(combined["by_seed"], (0.1, 0.3))]}
    }
    diff = paired_difference(result, shifted)
    assert diff["by_seed"] == pytest.approx([0.1, 0.3]) and diff["mean"] == pytest.approx(0.2)
    assert diff["std"] == pytest.approx(2**0.5 * 0.1)
