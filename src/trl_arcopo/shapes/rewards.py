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
r"""
Verifiable rewards of the Moving Shapes world, vectorised over a batch of videos.

Every reward has the project's signature `fn(prompts, videos, **kwargs) -> list[float]` with `videos`
`[N, F, C=3, H, W]` in `[0, 1]`, returns one python float in `[0, 1]` per video and ignores extra keyword arguments
(dataset columns, `trainer_state`). The definitions and thresholds are in `docs/moving_shapes.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .world import COLOURS, DIRECTION_VECTORS, PALETTE, SHAPES, parse_prompt


#: A pixel belongs to the foreground when its brightest channel exceeds this.
BRIGHT_THRESHOLD = 0.5
#: The object of a frame is its largest 4-connected foreground component; it is "present" when it has at least this
#: many pixels ...
MIN_OBJECT_AREA = 4
#: ... and covers at most this fraction of the frame (a frame-filling blob, e.g. noise, is not an object).
MAX_OBJECT_FRACTION = 0.4
#: Shape prototypes: bounding-box fill ratio (a triangle fills half its box, a circle pi / 4) and fraction of the
#: box's 4 corner pixels on the object (a triangle pointing up has its 2 base corners); the corner feature is weighted
#: by `CORNER_WEIGHT` in the nearest-prototype distance, so fill dominates and corners separate small circles from
#: squares.
SHAPE_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
SHAPE_CORNERS = {"square": 1.0, "circle": 0.0, "triangle": 0.5}
CORNER_WEIGHT = 0.5
#: A frame's object has no shape when its fill ratio is below this or its box is more elongated than this.
MIN_SHAPE_FILL = 0.35
MAX_ASPECT_RATIO = 1.5
#: The fitted straight-line motion must move the object at least this many pixels (lengths are for 32-pixel frames
#: and scale with `max(H, W) / 32`).
MIN_DISPLACEMENT = 3.0
#: Scales of the temporal-quality terms: a mean colour drift of `COLOUR_DRIFT_SCALE` (RGB distance) or a mean
#: centroid acceleration of `ACCELERATION_SCALE` pixels / frame^2 (times `max(H, W) / 32`) zeroes the term.
COLOUR_DRIFT_SCALE = 0.5
ACCELERATION_SCALE = 2.0
#: The preference reward: `PROMINENCE_SCALE` x the fraction of foreground pixels, clipped at 1, so an object that covers
#: a fifth of the frame (or more) scores 1.
PROMINENCE_SCALE = 5.0

#: `r * 4 + g * 2 + b` of a rounded hue -> index into `COLOURS` (codes 0 and 7 never occur).
_HUE_CODE_TO_COLOUR = [4 * round(r) + 2 * round(g) + round(b) for r, g, b in (PALETTE[c] for c in COLOURS)]


@dataclass
class VideoAnalysis:
    r"""
    Per-frame measurements of the object in a batch of videos (see [`analyse_videos`]).

    Args:
        present (`torch.Tensor` of shape `[N, F]`, bool): the frame has an object. The other per-frame values are
            computed for every frame but only mean something where it is `True`.
        area (`torch.Tensor` of shape `[N, F]`): object pixels (the largest 4-connected foreground component); 0
            when absent.
        soft_area (`torch.Tensor` of shape `[N, F]`): summed brightness of the object grown by one pixel (its
            anti-aliased rim included); 0 when absent.
        clean (`torch.Tensor` of shape `[N, F]`): object pixels / foreground pixels (1 for a single blob, 0 when
            there is no foreground).
        centroid (`torch.Tensor` of shape `[N, F, 2]`): `(x, y)` of the object in pixel coordinates (pixel `(i, j)`
            has its centre at `(j + 0.5, i + 0.5)`), brightness-weighted over the object grown by one pixel.
        fill (`torch.Tensor` of shape `[N, F]`): object area / bounding-box area.
        corners (`torch.Tensor` of shape `[N, F]`): fraction of the bounding box's 4 corner pixels on the object.
        aspect (`torch.Tensor` of shape `[N, F]`): long side / short side of the bounding box (>= 1).
        colour (`torch.Tensor` of shape `[N, F, 3]`): brightness-weighted mean RGB of the object's pixels.
        colour_votes (`torch.Tensor` of shape `[N, F, 6]`): object pixels whose hue is nearest each of `COLOURS`.
        shape_class (`torch.Tensor` of shape `[N, F]`, long): index into `SHAPES` of the nearest prototype, `-1` for
            no shape (absent, too sparse or too elongated).
        frame_size (`int`): `max(H, W)`; pixel thresholds are given for 32 and scaled by `frame_size / 32`.
    """

    present: torch.Tensor
    area: torch.Tensor
    soft_area: torch.Tensor
    clean: torch.Tensor
    centroid: torch.Tensor
    fill: torch.Tensor
    corners: torch.Tensor
    aspect: torch.Tensor
    colour: torch.Tensor
    colour_votes: torch.Tensor
    shape_class: torch.Tensor
    frame_size: int = 32


#: The world's verifiable rewards (text alignment and quality), the reward names of the shape-binding job.
VERIFIABLE_REWARDS = ["colour_reward", "shape_reward", "direction_reward", "temporal_quality_reward"]


def _label_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of `[B, H, W]` bool masks: `0` off the mask, else 1 + the largest flat pixel
    index of the pixel's component.

    Every label is 1 + the index of a pixel of the same component and only grows. Each round takes the maximum over
    the 4 neighbours, hooks the pixel a label points to onto that maximum too (so whole trees merge at once), then
    follows pointers twice; rounds run on the masks that still changed. Converges in a handful of rounds even on
    noise.
    """
    b, h, w = mask.shape
    maskf = mask.float()[:, None]  # [B, 1, H, W]
    index = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)  # exact below 2^24
    labels = maskf * index  # [B, 1, H, W]
    active = torch.arange(b, device=mask.device)  # masks not converged yet
    current, current_mask = labels, maskf
    for _ in range(h * w):
        if active.numel() == 0:
            break
        padded = F.pad(current, (1, 1, 1, 1))  # [B', 1, H + 2, W + 2]
        horizontal = torch.maximum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])  # [B', 1, H, W]
        vertical = torch.maximum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1])  # [B', 1, H, W]
        neighbours = torch.maximum(torch.maximum(horizontal, vertical), current)  # [B', 1, H, W] pixel + 4 neighbours
        neighbours = (neighbours * current_mask).view(-1, h * w)  # [B', H * W]
        pointers = current.view(-1, h * w).long()  # [B', H * W] 1 + a pixel of the same component, 0 off the mask
        flat = F.pad(current.view(-1, h * w), (1, 0))  # [B', 1 + H * W], slot 0 for the background
        flat = flat.scatter_reduce(1, pointers, neighbours, "amax")  # hook: the pointed-to pixel takes the max too
        new = torch.maximum(flat[:, 1:], neighbours)  # [B', H * W]
        for _ in range(2):  # pointer jumping
            new = F.pad(new, (1, 0)).gather(1, new.long())  # [B', H * W]
        new = new.view(-1, 1, h, w)  # [B', 1, H, W]
        changed = (new != current).flatten(1).any(dim=1)  # [B']
        labels[active] = new
        active, current, current_mask = active[changed], new[changed], current_mask[changed]
    return labels.view(b, h, w).long()


def analyse_videos(videos: torch.Tensor) -> VideoAnalysis:
    r"""
    Find and measure the object in every frame of a batch of videos.

    The foreground is every pixel whose brightest channel exceeds `BRIGHT_THRESHOLD`; the object is the largest
    4-connected foreground component, present when it has `MIN_OBJECT_AREA` to `MAX_OBJECT_FRACTION * H * W` pixels.

    Args:
        videos (`torch.Tensor` of shape `[N, F, 3, H, W]`): values in `[0, 1]` (clamped; NaN counts as 0).

    Returns:
        [`VideoAnalysis`]
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"Expected videos of shape [N, F, 3, H, W], got {tuple(videos.shape)}.")
    n, f, _, h, w = videos.shape
    b = n * f
    device = videos.device
    x = videos.detach().float().nan_to_num(0.0).clamp(0, 1).reshape(b, 3, h, w)  # [B, 3, H, W], B = N * F
    bright = x.amax(dim=1)  # [B, H, W]
    foreground = bright > BRIGHT_THRESHOLD  # [B, H, W]

    labels = _label_components(foreground).view(b, h * w)  # [B, H * W]
    sizes = torch.zeros(b, h * w + 1, device=device).scatter_add_(
        1, labels, torch.ones_like(labels, dtype=torch.float)
    )
    sizes[:, 0] = 0  # [B, 1 + H * W] pixels per label, background dropped
    area, largest = sizes.max(dim=1)  # [B], [B]
    obj = ((labels == largest[:, None]) & (area[:, None] > 0)).view(b, h, w)  # [B, H, W] the object
    objf = obj.float()  # [B, H, W]
    clean = area / foreground.flatten(1).sum(1).clamp(min=1)  # [B]
    present = (area >= MIN_OBJECT_AREA) & (area <= MAX_OBJECT_FRACTION * h * w)  # [B]

    # Centroid and soft area over the object grown by one pixel, weighted by brightness: this takes in the dim
    # anti-aliased rim, so they move smoothly with sub-pixel motion.
    halo = F.max_pool2d(objf[:, None], 3, 1, 1)[:, 0] * bright  # [B, H, W]
    soft_area = halo.sum(dim=(1, 2))  # [B]
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5  # [W] pixel centres
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5  # [H]
    centroid = torch.stack(((halo.sum(1) * xs).sum(1), (halo.sum(2) * ys).sum(1)), dim=-1)  # [B, 2]
    centroid = centroid / soft_area.clamp(min=1e-6)[:, None]  # [B, 2]

    rows, cols = obj.any(dim=2).float(), obj.any(dim=1).float()  # [B, H], [B, W]
    top, bottom = rows.argmax(1), h - 1 - rows.flip(1).argmax(1)  # [B], [B] (first maximum)
    left, right = cols.argmax(1), w - 1 - cols.flip(1).argmax(1)  # [B], [B]
    height, width = (bottom - top + 1).float(), (right - left + 1).float()  # [B], [B]
    fill = area / (height * width)  # [B]
    aspect = torch.maximum(height, width) / torch.minimum(height, width)  # [B]
    corner_index = torch.stack((top * w + left, top * w + right, bottom * w + left, bottom * w + right), 1)  # [B, 4]
    corners = objf.view(b, h * w).gather(1, corner_index).mean(1)  # [B] fraction of box corners on the object

    obj_weight = objf * bright  # [B, H, W]
    colour = (x * obj_weight[:, None]).sum(dim=(2, 3)) / obj_weight.sum(dim=(1, 2)).clamp(min=1e-6)[:, None]  # [B, 3]
    # Nearest palette colour of each pixel's hue (RGB / brightest channel, Euclidean): round every hue channel to 0 or
    # 1 (a channel is on above half the brightest); if all three are on (whitish), turn off the weakest.
    red, green, blue = x.unbind(1)  # [B, H, W] each
    half = bright / 2  # [B, H, W]
    on_r, on_g, on_b = red > half, green > half, blue > half  # [B, H, W] each
    whitish = on_r & on_g & on_b  # [B, H, W]
    off_r = whitish & (red <= green) & (red <= blue)  # [B, H, W]
    off_g = whitish & ~off_r & (green <= blue)  # [B, H, W]
    off_b = whitish & ~off_r & ~off_g  # [B, H, W]
    code = (on_r & ~off_r).long() * 4 + (on_g & ~off_g).long() * 2 + (on_b & ~off_b).long()  # [B, H, W] in 1..6
    votes = torch.zeros(b, 8, device=device).scatter_add_(1, code.view(b, h * w), objf.view(b, h * w))  # [B, 8]
    votes = votes[:, _HUE_CODE_TO_COLOUR]  # [B, 6] object pixels per palette colour

    features = torch.stack((fill, CORNER_WEIGHT * corners), dim=-1)  # [B, 2]
    prototypes = torch.tensor([[SHAPE_FILL[s], CORNER_WEIGHT * SHAPE_CORNERS[s]] for s in SHAPES], device=device)
    shape_class = (features[:, None] - prototypes).square().sum(-1).argmin(1)  # [B]
    has_shape = present & (fill >= MIN_SHAPE_FILL) & (aspect <= MAX_ASPECT_RATIO)  # [B]
    shape_class = torch.where(has_shape, shape_class, -1)  # [B]

    def unflatten(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, f, *t.shape[1:])

    return VideoAnalysis(
        present=unflatten(present),
        area=unflatten(torch.where(present, area, 0.0)),
        soft_area=unflatten(torch.where(present, soft_area, 0.0)),
        clean=unflatten(clean),
        centroid=unflatten(centroid),
        fill=unflatten(fill),
        corners=unflatten(corners),
        aspect=unflatten(aspect),
        colour=unflatten(colour),
        colour_votes=unflatten(votes),
        shape_class=unflatten(shape_class),
        frame_size=max(h, w),
    )


def _prompt_indices(prompts: Sequence[str], num_videos: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) != num_videos:
        raise ValueError(f"Got {len(prompts)} prompts for {num_videos} videos; give one prompt per video.")
    parsed = [parse_prompt(p) for p in prompts]
    colour = torch.tensor([COLOURS.index(c) for c, _, _ in parsed], device=device, dtype=torch.long)  # [N]
    shape = torch.tensor([SHAPES.index(s) for _, s, _ in parsed], device=device, dtype=torch.long)  # [N]
    vectors = [DIRECTION_VECTORS[d] for _, _, d in parsed]
    direction = torch.tensor(vectors, device=device, dtype=torch.float).view(-1, 2)  # [N, 2] unit (dx, dy)
    return colour, shape, direction


def _colour_scores(a: VideoAnalysis, colour: torch.Tensor) -> torch.Tensor:
    votes = (a.colour_votes * a.present[..., None]).sum(1)  # [N, 6] object pixels of present frames, per hue
    target = votes.gather(1, colour[:, None]).squeeze(1)  # [N]
    return target / votes.sum(1).clamp(min=1)  # [N]


def _shape_scores(a: VideoAnalysis, shape: torch.Tensor) -> torch.Tensor:
    hits = ((a.shape_class == shape[:, None]) & a.present).sum(1).float()  # [N]
    return hits / a.present.sum(1).clamp(min=1)  # [N]


def _direction_scores(a: VideoAnalysis, direction: torch.Tensor) -> torch.Tensor:
    n, f = a.present.shape
    wgt = a.present.float()  # [N, F]
    count = wgt.sum(1)  # [N]
    t = torch.arange(f, device=wgt.device, dtype=torch.float32).expand(n, f)  # [N, F]
    t_mean = (wgt * t).sum(1) / count.clamp(min=1)  # [N]
    dt = (t - t_mean[:, None]) * wgt  # [N, F], 0 on absent frames
    c_mean = (wgt[..., None] * a.centroid).sum(1) / count.clamp(min=1)[:, None]  # [N, 2]
    slope = (dt[..., None] * (a.centroid - c_mean[:, None])).sum(1) / dt.square().sum(1).clamp(min=1e-6)[:, None]
    big = torch.full_like(t, f)  # [N, F]
    span = torch.where(a.present, t, -1.0).amax(1) - torch.where(a.present, t, big).amin(1)  # [N] first to last
    displacement = slope * span.clamp(min=0)[:, None]  # [N, 2] fitted motion while visible
    along = (displacement * direction).sum(1)  # [N]
    across = (displacement * direction.flip(1)).sum(1).abs()  # [N] (the perpendicular of an axis vector)
    return ((count >= 2) & (along >= MIN_DISPLACEMENT * a.frame_size / 32) & (along > across)).float()  # [N]


def _prominence_scores(videos: torch.Tensor) -> torch.Tensor:
    bright = videos.detach().float().nan_to_num(0.0).amax(dim=2) > BRIGHT_THRESHOLD  # [N, F, H, W]
    return (PROMINENCE_SCALE * bright.float().mean(dim=(1, 2, 3))).clamp(0, 1)  # [N]


def _temporal_terms(a: VideoAnalysis) -> dict[str, torch.Tensor]:
    n, f = a.present.shape
    present = a.present.float()  # [N, F]
    count = present.sum(1)  # [N]
    presence = (present * a.clean).mean(1)  # [N]

    area_mean = a.soft_area.mean(1)  # [N] absent frames count as area 0
    area_std = (a.soft_area - area_mean[:, None]).square().mean(1).sqrt()  # [N]
    area_cv = area_std / area_mean.clamp(min=1e-6)  # [N]
    area_stability = torch.where(area_mean > 0, (1 - area_cv).clamp(0, 1), 0.0)  # [N]

    c_mean = (present[..., None] * a.colour).sum(1) / count.clamp(min=1)[:, None]  # [N, 3]
    drift = ((a.colour - c_mean[:, None]).norm(dim=-1) * present).sum(1) / count.clamp(min=1)  # [N]
    colour_stability = torch.where(count > 0, (1 - drift / COLOUR_DRIFT_SCALE).clamp(0, 1), 0.0)  # [N]

    if f < 3:
        smoothness = torch.ones(n, device=present.device)
    else:
        triple = present[:, :-2] * present[:, 1:-1] * present[:, 2:]  # [N, F - 2]
        c = a.centroid  # [N, F, 2]
        accel = (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)  # [N, F - 2]
        mean_accel = (accel * triple).sum(1) / triple.sum(1).clamp(min=1)  # [N]
        smoothness = torch.where(
            triple.sum(1) > 0, (1 - mean_accel / (ACCELERATION_SCALE * a.frame_size / 32)).clamp(0, 1), 0.0
        )  # [N]
    quality = presence * area_stability * colour_stability * smoothness  # [N]
    return {
        "presence": presence,
        "area_stability": area_stability,
        "colour_stability": colour_stability,
        "smoothness": smoothness,
        "temporal_quality": quality,
    }


def score_videos(prompts: Sequence[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""
    Every Moving Shapes score of a batch from a single analysis (what the reward functions return, as tensors).

    Args:
        prompts (`Sequence[str]`): one Moving Shapes prompt per video.
        videos (`torch.Tensor` of shape `[N, F, 3, H, W]`): values in `[0, 1]`.

    Returns:
        `dict[str, torch.Tensor]`: `[N]` float32 tensors `colour`, `shape`, `direction`, `temporal_quality` (and its
        terms `presence`, `area_stability`, `colour_stability`, `smoothness`), `combined`, `all_correct` and the
        preference `prominence` (not part of `combined`).
    """
    a = analyse_videos(videos)
    colour, shape, direction = _prompt_indices(prompts, videos.shape[0], a.present.device)
    scores = {
        "colour": _colour_scores(a, colour),
        "shape": _shape_scores(a, shape),
        "direction": _direction_scores(a, direction),
    }
    scores.update(_temporal_terms(a))
    scores["prominence"] = _prominence_scores(videos)
    attributes = torch.stack((scores["colour"], scores["shape"], scores["direction"]))  # [3, N]
    scores["combined"] = (attributes.sum(0) + scores["temporal_quality"]) / 4
    scores["all_correct"] = (attributes >= 0.5).all(0).float()
    return scores


def _to_list(scores: torch.Tensor) -> list[float]:
    return [float(v) for v in scores.clamp(0, 1).tolist()]


def colour_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    Fraction of the object's pixels, over all frames with an object, whose hue is nearest the prompt's colour.

    A pixel's hue is its RGB divided by its brightest channel; "nearest" is the Euclidean distance to the six palette
    colours. 1 on ground truth, 0 for a pure wrong colour or no object; `>= 0.5` means the prompt's colour is the
    majority. Extra keyword arguments are ignored.
    """
    a = analyse_videos(videos)
    colour, _, _ = _prompt_indices(prompts, videos.shape[0], a.present.device)
    return _to_list(_colour_scores(a, colour))


def shape_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    Fraction of the frames with an object in which the object is classified as the prompt's shape.

    The classifier takes the nearest of the three prototypes in the plane (bounding-box fill ratio,
    `CORNER_WEIGHT` x fraction of the box's 4 corner pixels on the object): square `(1, 1)`, circle `(pi / 4, 0)`,
    triangle `(1 / 2, 1 / 2)` before weighting. An object filling less than `MIN_SHAPE_FILL` of its box or with a box
    more elongated than `MAX_ASPECT_RATIO` has no shape. 0 when no frame has an object. Extra keyword arguments are
    ignored.
    """
    a = analyse_videos(videos)
    _, shape, _ = _prompt_indices(prompts, videos.shape[0], a.present.device)
    return _to_list(_shape_scores(a, shape))


def direction_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    1 if the object moves the prompt's way, else 0.

    A least-squares line is fitted to the object's centroid `(x, y)` against the frame index over the frames with an
    object (at least 2); the displacement is its slope times the frames from the first to the last of them. The
    reward is 1 when the displacement along the prompt's direction is at least `MIN_DISPLACEMENT` (3) pixels (times
    `max(H, W) / 32`) and larger than the displacement across it, so that both the dominant axis and the sign match.
    Image `y` points down: "up" is a negative `y` slope. Extra keyword arguments are ignored.
    """
    a = analyse_videos(videos)
    _, _, direction = _prompt_indices(prompts, videos.shape[0], a.present.device)
    return _to_list(_direction_scores(a, direction))


def temporal_quality_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    "One compact object of stable size and colour moving smoothly, no flicker", in `[0, 1]`, prompt-independent.

    The product `P * S_A * S_C * S_M` of four terms in `[0, 1]`, each 1 for a perfect video:

    - presence `P`: mean over all frames of `present * clean` (`clean` = object pixels / foreground pixels, so stray
      blobs lower it);
    - area stability `S_A = clip(1 - std / mean, 0, 1)` of the object area over all frames (absent frames count 0);
    - colour stability `S_C = clip(1 - d / COLOUR_DRIFT_SCALE, 0, 1)` with `d` the mean RGB distance of each present
      frame's mean object colour to their average;
    - smoothness `S_M = clip(1 - a / ACCELERATION_SCALE, 0, 1)` (2 pixels / frame², times `max(H, W) / 32`) with `a`
      the mean centroid acceleration `|c[t + 1] - 2 c[t] + c[t - 1]|` over runs of 3 consecutive present frames (0 if
      there is none; 1 for clips shorter than 3 frames).

    Extra keyword arguments (and the prompts) are ignored.
    """
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"Got {len(prompts)} prompts for {videos.shape[0]} videos; give one prompt per video.")
    return _to_list(_temporal_terms(analyse_videos(videos))["temporal_quality"])


def prominence_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    Subject prominence, the world's preference: larger objects are preferred. Prompt-independent, in `[0, 1]`.

    `min(1, PROMINENCE_SCALE * b)` with `b` the fraction of pixels, over all frames, whose brightest channel exceeds
    `BRIGHT_THRESHOLD` (the foreground of [`analyse_videos`]). With `PROMINENCE_SCALE = 5` an object covering a fifth
    of the frame scores 1; the shipped generator's objects (about 7-8 % of a 32 x 32 frame) score about 0.38.

    Like a learned preference model it can be hacked: it only counts bright pixels, so a frame-filling blob scores 1
    while it has no shape and no object (`all_correct` is 0). Train it next to the attribute and quality rewards.
    Extra keyword arguments are ignored.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"Expected videos of shape [N, F, 3, H, W], got {tuple(videos.shape)}.")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"Got {len(prompts)} prompts for {videos.shape[0]} videos; give one prompt per video.")
    return _to_list(_prominence_scores(videos))


def combined_reward(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    `(colour + shape + direction + temporal_quality) / 4`, each the reward of the same name. Extra keyword arguments
    are ignored.
    """
    return _to_list(score_videos(prompts, videos)["combined"])


def all_correct(prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float]:
    r"""
    1 if colour, shape and direction are all correct (each reward `>= 0.5`), else 0: the success rate metric. Extra
    keyword arguments are ignored.
    """
    return _to_list(score_videos(prompts, videos)["all_correct"])
