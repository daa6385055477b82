import re

import pytest
import torch

from trl_arcopo.shapes import (
    ALL_PROMPTS,
    COLOURS,
    DIRECTIONS,
    HELDOUT_PROMPTS,
    PALETTE,
    SHAPES,
    TRAIN_PROMPTS,
    all_correct,
    colour_reward,
    combined_reward,
    direction_reward,
    format_prompt,
    make_dataset,
    parse_prompt,
    prominence_reward,
    render_batch,
    render_video,
    sample_motion,
    score_videos,
    shape_reward,
    temporal_quality_reward,
    vocabulary,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are small: one thread is fastest, and much faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REWARDS = [
    colour_reward,
    shape_reward,
    direction_reward,
    temporal_quality_reward,
    combined_reward,
    all_correct,
    prominence_reward,
]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def ground_truth():
    """All 72 prompts x 3 seeds, rendered: `(prompts, seeds, videos [216, 12, 3, 32, 32])`."""
    prompts = [p for p in ALL_PROMPTS for _ in SEEDS]
    seeds = [s for _ in ALL_PROMPTS for s in SEEDS]
    return prompts, seeds, render_batch(prompts, seeds)


def _other(values, value, k):
    return values[(values.index(value) + 1 + k % (len(values) - 1)) % len(values)]


# ---------------------------------------------------------------------------------------------------------- world


def test_render_shape_dtype_range_and_determinism():
    video = render_video("red", "circle", "left", seed=3)
    assert video.shape == (12, 3, 32, 32) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1 and video.max() == 1  # pure colour inside the object
    assert torch.equal(video, render_video("red", "circle", "left", seed=3))
    assert not torch.equal(video, render_video("red", "circle", "left", seed=4))
    assert not torch.equal(video[0], video[-1])  # it moves
    assert render_video("blue", "square", "up", num_frames=5, size=48).shape == (5, 3, 48, 48)
    batch = render_batch(["a red circle moving left", "a cyan triangle moving up"], [3, 0])
    assert batch.shape == (2, 12, 3, 32, 32) and torch.equal(batch[0], video)
    assert render_batch(["a red circle moving left"] * 2, 3).shape == (2, 12, 3, 32, 32)
    with pytest.raises(ValueError, match="one seed per prompt"):
        render_batch(["a red circle moving left"], [1, 2])
    with pytest.raises(ValueError, match="Unknown shape 'hexagon'"):
        render_video("red", "hexagon", "left")


@pytest.mark.parametrize("seed_offset", [0, 1000])
def test_object_inside_frame_and_single_colour(seed_offset):
    seeds = range(seed_offset, seed_offset + 4)
    prompts = [p for p in ALL_PROMPTS for _ in seeds]
    videos = render_batch(prompts, [s for _ in ALL_PROMPTS for s in seeds])  # [288, 12, 3, 32, 32]
    border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., :, 0], videos[..., :, -1]], dim=-1)
    assert border.abs().max() == 0  # never touches the border: fully inside in every frame
    lit = videos.amax(dim=2)  # [N, F, H, W]
    assert (lit.flatten(2).amax(-1) == 1).all()  # the object is visible in every frame
    rgb = torch.tensor([PALETTE[parse_prompt(p)[0]] for p in prompts])  # [N, 3]
    # every pixel is (coverage x) the prompt's pure colour: one colour only
    torch.testing.assert_close(videos, lit[:, :, None] * rgb[:, None, :, None, None], rtol=0, atol=0)
    for direction in DIRECTIONS:
        for seed in seeds:
            motion = sample_motion(direction, seed)
            centres = motion.centres(12)  # [12, 2]
            half = motion.object_size / 2
            assert (centres - half).min() >= 1 and (centres + half).max() <= 31
            assert 8 <= motion.object_size <= 12 and 1 <= motion.speed <= 1.5


def test_prompt_split():
    assert len(ALL_PROMPTS) == 72 == len(set(ALL_PROMPTS))
    assert len(TRAIN_PROMPTS) == 60 and len(HELDOUT_PROMPTS) == 12
    assert not set(TRAIN_PROMPTS) & set(HELDOUT_PROMPTS)
    assert set(TRAIN_PROMPTS) | set(HELDOUT_PROMPTS) == set(ALL_PROMPTS)
    train = [parse_prompt(p) for p in TRAIN_PROMPTS]
    for i, values in enumerate((COLOURS, SHAPES, DIRECTIONS)):
        assert {t[i] for t in train} == set(values)
    # every pair of attributes of a held-out prompt is seen in training
    for colour, shape, direction in map(parse_prompt, HELDOUT_PROMPTS):
        assert any(t[:2] == (colour, shape) for t in train)
        assert any((t[0], t[2]) == (colour, direction) for t in train)
        assert any(t[1:] == (shape, direction) for t in train)
    # the split is fixed: each (shape, direction) pair held out once, colour index (4 * shape + direction) mod 6
    assert HELDOUT_PROMPTS[:4] == (
        "a red square moving left",
        "a red circle moving up",
        "a green square moving right",
        "a green circle moving down",
    )
    held = [parse_prompt(p) for p in HELDOUT_PROMPTS]
    assert sorted((s, d) for _, s, d in held) == sorted((s, d) for s in SHAPES for d in DIRECTIONS)
    assert all(sum(h[0] == c for h in held) == 2 for c in COLOURS)


def test_parse_prompt_and_vocabulary():
    for prompt in ALL_PROMPTS:
        assert format_prompt(*parse_prompt(prompt)) == prompt
    assert parse_prompt("  A Red  Square moving LEFT ") == ("red", "square", "left")
    for bad in ["a pink square moving left", "a red square moving", "red square moving left", "a red square left up"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_prompt(bad)
    words = vocabulary()
    assert words == sorted(words) and len(words) == 15
    assert {w for p in ALL_PROMPTS for w in p.split()} == set(words)


def test_make_dataset():
    ds = make_dataset("train", repeats=2)
    assert ds.column_names == ["prompt", "colour", "shape", "direction"]
    assert len(ds) == 120 and ds["prompt"][:60] == list(TRAIN_PROMPTS) == ds["prompt"][60:]
    assert all(parse_prompt(r["prompt"]) == (r["colour"], r["shape"], r["direction"]) for r in ds)
    assert make_dataset("heldout")["prompt"] == list(HELDOUT_PROMPTS) and len(make_dataset("all")) == 72
    with pytest.raises(ValueError, match="Unknown split"):
        make_dataset("test")


# -------------------------------------------------------------------------------------------------------- rewards


def test_rewards_on_ground_truth(ground_truth):
    prompts, _, videos = ground_truth
    scores = score_videos(prompts, videos)
    for name in ("colour", "shape", "direction", "all_correct"):
        assert (scores[name] >= 0.5).float().mean() >= 0.95, name
    assert scores["temporal_quality"].mean() >= 0.8 and scores["combined"].mean() >= 0.9
    for reward in REWARDS:  # the reward functions return the same numbers
        expected = scores[reward.__name__.removesuffix("_reward")][::9].tolist()
        assert reward(prompts[::9], videos[::9]) == pytest.approx(expected)


def test_wrong_colour_and_wrong_shape_score_low(ground_truth):
    prompts, seeds, _ = ground_truth
    wrong_colour, wrong_shape = [], []
    for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
        colour, shape, direction = parse_prompt(prompt)
        wrong_colour.append(render_video(_other(COLOURS, colour, k), shape, direction, seed))
        wrong_shape.append(render_video(colour, _other(SHAPES, shape, k), direction, seed))
    colour = torch.tensor(colour_reward(prompts, torch.stack(wrong_colour)))
    assert colour.max() < 0.5 and colour.mean() < 0.1
    shape = torch.tensor(shape_reward(prompts, torch.stack(wrong_shape)))
    assert (shape < 0.5).float().mean() >= 0.9


def test_reversed_motion_scores_zero(ground_truth):
    prompts, _, videos = ground_truth
    assert direction_reward(prompts, videos.flip(1)) == [0.0] * len(prompts)
    assert sum(all_correct(prompts, videos.flip(1))) == 0
    static = videos[:, :1].expand_as(videos)  # no motion at all
    assert direction_reward(prompts, static) == [0.0] * len(prompts)


@pytest.mark.parametrize("kind", ["standard", "grey"])
def test_noise_scores_low(kind):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 12, 3, 32, 32, generator=g)
    noise = noise.clamp(0, 1) if kind == "standard" else (0.5 + 0.25 * noise).clamp(0, 1)
    prompts = list(ALL_PROMPTS[::4])[:16]
    scores = score_videos(prompts, noise)
    assert scores["temporal_quality"].max() < 0.3
    assert scores["all_correct"].sum() == 0
    assert scores["combined"].mean() < 0.25


def test_blank_videos_score_zero():
    prompts = list(ALL_PROMPTS[:4])
    for videos in (torch.zeros(4, 12, 3, 32, 32), torch.full((4, 12, 3, 32, 32), float("nan"))):
        for reward in REWARDS:
            assert reward(prompts, videos) == [0.0] * 4


def test_flicker_lowers_temporal_quality(ground_truth):
    prompts, seeds, videos = ground_truth
    prompts, seeds, videos = prompts[::9], seeds[::9], videos[::9]  # 24 videos
    good = torch.tensor(temporal_quality_reward(prompts, videos))
    alternate = videos.clone()
    alternate[:, 1::2] = 0  # the object only in every other frame
    assert torch.tensor(temporal_quality_reward(prompts, alternate)).max() < 0.3
    g = torch.Generator().manual_seed(0)
    recoloured = []
    for prompt, seed in zip(prompts, seeds):
        _, shape, direction = parse_prompt(prompt)
        frames = [
            render_video(COLOURS[int(c)], shape, direction, seed)[t]
            for t, c in enumerate(torch.randperm(6, generator=g).repeat(2))
        ]
        recoloured.append(torch.stack(frames))
    recoloured = torch.tensor(temporal_quality_reward(prompts, torch.stack(recoloured)))
    assert recoloured.max() < 0.3 and good.min() > 0.8
    speckled = videos.clone()
    speckled[:, :, :, ::7, ::7] = 1.0  # white dots around the object
    assert torch.tensor(temporal_quality_reward(prompts, speckled)).max() < 0.9 * good.min()


def test_reward_signature_and_outputs(ground_truth):
    prompts, _, videos = ground_truth
    prompts, videos = prompts[:5], videos[:5]
    columns = {k: [parse_prompt(p)[i] for p in prompts] for i, k in enumerate(("colour", "shape", "direction"))}
    for reward in REWARDS:
        values = reward(prompts=prompts, videos=videos, trainer_state=None, **columns)
        assert isinstance(values, list) and len(values) == 5
        assert all(type(v) is float and 0 <= v <= 1 for v in values)
        assert reward([], videos[:0]) == []
        with pytest.raises(ValueError, match="one prompt per video"):
            reward(prompts[:2], videos)
    with pytest.raises(ValueError, match="not a Moving Shapes prompt"):
        colour_reward(["a red fox"], videos[:1])
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        colour_reward(prompts, videos[:, :, 0])


def test_prominence_closed_form_and_monotone_in_size():
    """5 x the bright-pixel fraction, clipped at 1; for ground truth it rises with the object's size."""
    videos = torch.zeros(3, 2, 3, 10, 10)
    videos[0, :, 0, :2, :5] = 1.0  # 10 of 100 pixels bright in every frame: 5 * 0.1
    videos[1, 0, 1, :4] = 0.9  # 40 bright pixels in one frame of two: 5 * 0.2, exactly the clip
    videos[2] = 0.5  # not above the threshold
    assert prominence_reward(["p"] * 3, videos) == pytest.approx([0.5, 1.0, 0.0])
    # ground truth of every shape, static, at growing object sizes: strictly increasing scores
    for shape in SHAPES:
        scores = []
        for side in (4, 6, 8, 10, 12):
            frame = torch.zeros(3, 32, 32)
            if shape == "square":
                frame[0, 10 : 10 + side, 10 : 10 + side] = 1.0
            else:
                ys, xs = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
                dy, dx = ys - 16, xs - 16
                half = side / 2
                inside = (
                    dx**2 + dy**2 <= half**2 if shape == "circle" else (dy <= half) & (dx.abs() <= (dy + half) / 2)
                )
                frame[0][inside & (dy >= -half)] = 1.0
            scores.append(prominence_reward(["p"], frame.expand(1, 12, 3, 32, 32))[0])
        assert all(a < b for a, b in zip(scores, scores[1:])), (shape, scores)


def test_prominence_is_hacked_by_a_blob_and_ignores_the_prompt(ground_truth):
    """A frame-filling blob is the degenerate optimum: prominence 1, no object, so all-correct 0; noise and blank
    videos score as their bright pixels say, whatever the prompt."""
    prompts, _, videos = ground_truth
    prompts, videos = prompts[:24], videos[:24]
    truth = torch.tensor(prominence_reward(prompts, videos))
    assert 0.1 < truth.min() and truth.max() < 0.8  # ground-truth objects leave room to grow
    blob = videos.amax(dim=2, keepdim=True).clone().expand(-1, -1, 3, -1, -1).clone()
    blob[:, :, 0, 2:30, 2:30] = 1.0  # a red square filling most of the frame
    scores = score_videos(prompts, blob)
    assert scores["prominence"].tolist() == [1.0] * 24 and scores["all_correct"].sum() == 0
    assert scores["temporal_quality"].max() == 0.0  # too large to be an object
    noise = torch.rand(24, 12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert prominence_reward(prompts, noise) == [1.0] * 24  # 7/8 of uniform noise pixels are bright
    dim = noise * 0.2  # nothing above the threshold
    assert prominence_reward(prompts, dim) == [0.0] * 24
    shuffled = prompts[1:] + prompts[:1]
    assert prominence_reward(shuffled, videos) == truth.tolist()


def test_gradient_signal_share_closed_form():
    """`benchmarks/moving_shapes_gradient_signal.py`: gradients `μ + n_a` with orthogonal noises of equal norm have a
    signal share of exactly `|μ|² / (|μ|² + |n|²)`; pure noise along a few directions scores 0."""
    import os

    from helpers import load_script

    module = load_script(
        os.path.join(os.path.dirname(__file__), "..", "benchmarks", "moving_shapes_gradient_signal.py")
    )

    eye = torch.eye(6, dtype=torch.float64)
    mu, noise = 2.0 * eye[0], 3.0 * eye[1:5]  # 4 groups: the same μ, orthogonal noises of norm 3
    stats = module.signal_statistics(mu + noise)
    assert stats["signal_share"] == pytest.approx(4 / 13)
    assert stats["mean_cosine"] == pytest.approx(4 / 13)
    assert stats["directions"] == pytest.approx((13 / 4) ** 2)
    signs = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
    flips = module.signal_statistics(signs * eye[:1])  # one direction, each group its own sign: no common direction
    assert flips["signal_share"] == pytest.approx(-1 / 3) and flips["directions"] == pytest.approx(1.0)


def test_benchmark_fig2_forwards_to_reach_and_summary():
    """`benchmarks/moving_shapes.py`: the forward passes AR-CoPO needs to reach SDE-GRPO's final preference, read off
    the seeds' mean curves with linear interpolation between points."""
    import os

    from helpers import load_script

    module = load_script(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "moving_shapes.py"))
    curve = ([0, 1000, 2000, 3000], [0.4, 0.5, 0.7, 0.9], [0.0] * 4)
    assert module.forwards_to_reach(curve, 0.6) == pytest.approx(1500)
    assert module.forwards_to_reach(curve, 0.3) == 0  # already there at the start
    assert module.forwards_to_reach(curve, 0.95) is None  # never reached
    runs = [
        {"method": "sde_grpo", "seed": s, "curve": [(0, 0.4), (3000, 0.5), (6000, 0.6 + d)]}
        for s, d in ((0, 0.02), (1, -0.02))
    ]
    runs += [
        {"method": "arcopo_consistency", "seed": s, "curve": [(0, 0.4), (2000, 0.8), (4000, 0.9)]} for s in (0, 1)
    ]
    summary = module.fig2_summary(runs)
    assert summary["sde_grpo_final"] == pytest.approx(0.6) and summary["sde_grpo_forwards"] == 6000
    assert summary["arcopo_forwards"] == pytest.approx(1000) and summary["ratio"] == pytest.approx(1 / 6)
    halfway = summary["along_the_curve"][0]  # SDE-GRPO's 0.5 after 3000: AR-CoPO is there after 500
    assert halfway["sde_grpo_forwards"] == 3000 and halfway["arcopo_forwards"] == pytest.approx(500)
    assert len(summary["along_the_curve"]) == 2
    # trained − base per seed is taken against the base on the method's own sampler
    assert module.base_of("sde_grpo") == module.base_of("arcopo_consistency") == "base_consistency"
    assert module.base_of("arcopo_dual") == module.base_of("merged@0.4") == "base"
