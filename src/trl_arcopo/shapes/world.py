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
"""The "Moving Shapes" world: procedural text-to-video data with a fixed prompt split (see `docs/moving_shapes.md`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from datasets import Dataset


#: The six object colours, in palette order.
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
#: Pure RGB primaries and secondaries, one per colour of `COLOURS`.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
#: Directions in image coordinates: "up" is towards row 0, "right" towards the last column.
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Unit velocity `(dx, dy)` of each direction, in pixels (x to the right, y downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

PROMPT_TEMPLATE = "a {colour} {shape} moving {direction}"


def format_prompt(colour: str, shape: str, direction: str) -> str:
    """The prompt of one combination, e.g. `format_prompt("red", "square", "left") == "a red square moving left"`."""
    _check_attributes(colour, shape, direction)
    return PROMPT_TEMPLATE.format(colour=colour, shape=shape, direction=direction)


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    r"""
    Split a Moving Shapes prompt into its attributes.

    Case and surrounding or repeated whitespace are ignored; anything else must match `"a {colour} {shape} moving
    {direction}"` exactly.

    Args:
        prompt (`str`): e.g. `"a red square moving left"`.

    Returns:
        `tuple[str, str, str]`: `(colour, shape, direction)`, e.g. `("red", "square", "left")`.

    Raises:
        `ValueError`: if the prompt is not one of the 72 Moving Shapes prompts (the message names it).
    """
    words = prompt.lower().split() if isinstance(prompt, str) else []
    if (
        len(words) != 5
        or words[0] != "a"
        or words[3] != "moving"
        or words[1] not in COLOURS
        or words[2] not in SHAPES
        or words[4] not in DIRECTIONS
    ):
        raise ValueError(
            f"{prompt!r} is not a Moving Shapes prompt: expected 'a {{colour}} {{shape}} moving {{direction}}' with "
            f"colour in {list(COLOURS)}, shape in {list(SHAPES)} and direction in {list(DIRECTIONS)}."
        )
    return words[1], words[2], words[4]


def _check_attributes(colour: str, shape: str, direction: str) -> None:
    for name, value, allowed in (
        ("colour", colour, COLOURS),
        ("shape", shape, SHAPES),
        ("direction", direction, DIRECTIONS),
    ):
        if value not in allowed:
            raise ValueError(f"Unknown {name} {value!r}; expected one of {list(allowed)}.")


def _heldout_combinations() -> list[tuple[str, str, str]]:
    # Every (shape, direction) pair is held out exactly once, with colour index (4 * shape + direction) mod 6. Then
    # each colour is held out twice, each shape 4 times, each direction 3 times, and no (colour, shape) or
    # (colour, direction) pair twice: every pair of attributes of a held-out prompt is still seen in training.
    return [
        (COLOURS[(4 * i + j) % len(COLOURS)], shape, direction)
        for i, shape in enumerate(SHAPES)
        for j, direction in enumerate(DIRECTIONS)
    ]


#: All 72 prompts, colour-major (`"a red square moving left"`, `"a red square moving right"`, ...).
ALL_PROMPTS: tuple[str, ...] = tuple(format_prompt(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS)
#: The 12 held-out prompts (never used for RL training), in `ALL_PROMPTS` order.
HELDOUT_PROMPTS: tuple[str, ...] = tuple(p for p in ALL_PROMPTS if parse_prompt(p) in set(_heldout_combinations()))
#: The 60 RL-training prompts, in `ALL_PROMPTS` order.
TRAIN_PROMPTS: tuple[str, ...] = tuple(p for p in ALL_PROMPTS if p not in HELDOUT_PROMPTS)


def vocabulary() -> list[str]:
    """The sorted list of the 15 distinct words used by the prompts (for an in-memory word-level tokenizer)."""
    return sorted({word for prompt in ALL_PROMPTS for word in prompt.split()})


@dataclass(frozen=True)
class Motion:
    r"""
    The random geometry of one video: object size, start position and constant velocity.

    Positions are continuous pixel coordinates: pixel `(row i, column j)` covers `[j, j + 1] x [i, i + 1]`, so the
    frame spans `[0, size]` in both `x` (to the right) and `y` (downwards). The object is centred on its bounding box
    centre.

    Args:
        object_size (`float`): side of the square, diameter of the circle, base and height of the triangle (pixels).
        speed (`float`): pixels per frame.
        start (`tuple[float, float]`): `(x, y)` of the object centre in the first frame.
        velocity (`tuple[float, float]`): `(dx, dy)` per frame; exactly one component is non-zero.
    """

    object_size: float
    speed: float
    start: tuple[float, float]
    velocity: tuple[float, float]

    def centres(self, num_frames: int) -> torch.Tensor:
        """The object centre in every frame, `[num_frames, 2]` float64 `(x, y)`."""
        t = torch.arange(num_frames, dtype=torch.float64)  # [F]
        start = torch.tensor(self.start, dtype=torch.float64)  # [2]
        velocity = torch.tensor(self.velocity, dtype=torch.float64)  # [2]
        return start + t[:, None] * velocity  # [F, 2]


#: Ranges of the random geometry for the default 32x32 frame; they scale linearly with `size`.
OBJECT_SIZE_RANGE = (8.0, 12.0)
SPEED_RANGE = (1.0, 1.5)
#: Pixels kept free between the object's bounding box and the frame border.
MARGIN = 1.0


def sample_motion(direction: str, seed: int = 0, num_frames: int = 12, size: int = 32) -> Motion:
    r"""
    Draw the geometry of one video from `seed` alone (so two prompts with the same seed share size, speed and
    position, and differ only in what the prompt names).

    Object size is uniform in `OBJECT_SIZE_RANGE` and speed uniform in `SPEED_RANGE` (both times `size / 32`); the
    speed is lowered if the whole path would not fit. The start is uniform among the positions from which the object
    stays at least `MARGIN` pixels inside the frame for all `num_frames` frames; the coordinate across the motion is
    uniform within the same bounds.

    Args:
        direction (`str`): one of `DIRECTIONS`.
        seed (`int`, *optional*, defaults to `0`): any integer.
        num_frames (`int`, *optional*, defaults to `12`): number of frames.
        size (`int`, *optional*, defaults to `32`): frame height and width in pixels.

    Returns:
        [`Motion`]
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"Unknown direction {direction!r}; expected one of {list(DIRECTIONS)}.")
    if num_frames < 1 or size < 8:
        raise ValueError(f"Need num_frames >= 1 and size >= 8, got num_frames={num_frames} and size={size}.")
    rng = random.Random(seed)
    scale = size / 32
    object_size = rng.uniform(*OBJECT_SIZE_RANGE) * scale
    speed = rng.uniform(*SPEED_RANGE) * scale
    along, across = rng.random(), rng.random()
    low, high = MARGIN + object_size / 2, size - MARGIN - object_size / 2  # bounds of the centre
    if num_frames > 1:
        speed = min(speed, (high - low) / (num_frames - 1))
    travel = speed * (num_frames - 1)
    dx, dy = DIRECTION_VECTORS[direction]
    sign = dx + dy
    start_along = low + along * (high - low - travel) if sign > 0 else high - along * (high - low - travel)
    start_across = low + across * (high - low)
    start = (start_along, start_across) if dx != 0 else (start_across, start_along)
    return Motion(object_size=object_size, speed=speed, start=start, velocity=(dx * speed, dy * speed))


#: Sub-pixel samples per axis for anti-aliasing: a pixel's value is the covered fraction times the pure colour.
SUPERSAMPLING = 4


def render_video(
    colour: str, shape: str, direction: str, seed: int = 0, num_frames: int = 12, size: int = 32
) -> torch.Tensor:
    r"""
    Render one Moving Shapes video: one object of a pure palette colour on black, moving at constant speed.

    Edges are anti-aliased by `SUPERSAMPLING`² sub-pixel samples (an edge pixel is the pure colour times the covered
    fraction), so the colour is exact inside the object and every lit pixel has the object's hue. The triangle is
    isosceles and always points up (apex at the top, base as wide as it is high).

    Args:
        colour (`str`): one of `COLOURS`.
        shape (`str`): one of `SHAPES`.
        direction (`str`): one of `DIRECTIONS`.
        seed (`int`, *optional*, defaults to `0`): fixes size, speed and start (see [`sample_motion`]).
        num_frames (`int`, *optional*, defaults to `12`): number of frames.
        size (`int`, *optional*, defaults to `32`): frame height and width in pixels.

    Returns:
        `torch.Tensor`: `[num_frames, 3, size, size]` float32 in `[0, 1]`.

    Example:

    ```py
    >>> video = render_video("red", "circle", "left", seed=3)
    >>> video.shape
    torch.Size([12, 3, 32, 32])
    ```
    """
    _check_attributes(colour, shape, direction)
    motion = sample_motion(direction, seed=seed, num_frames=num_frames, size=size)
    centres = motion.centres(num_frames)  # [F, 2]
    ss = SUPERSAMPLING
    coords = (torch.arange(size * ss, dtype=torch.float64) + 0.5) / ss  # [size * ss] sub-pixel centres
    dx = coords[None, None, :] - centres[:, 0, None, None]  # [F, 1, size * ss]
    dy = coords[None, :, None] - centres[:, 1, None, None]  # [F, size * ss, 1]
    half = motion.object_size / 2
    if shape == "square":
        inside = (dx.abs() <= half) & (dy.abs() <= half)  # [F, size * ss, size * ss]
    elif shape == "circle":
        inside = dx.square() + dy.square() <= half**2  # [F, size * ss, size * ss]
    else:  # triangle pointing up: half-width grows from 0 at the apex (dy = -half) to `half` at the base
        inside = (dy <= half) & (dx.abs() <= (dy + half) / 2)  # [F, size * ss, size * ss]
    coverage = inside.to(torch.float32).view(num_frames, size, ss, size, ss).mean(dim=(2, 4))  # [F, size, size]
    rgb = torch.tensor(PALETTE[colour], dtype=torch.float32)  # [3]
    return coverage[:, None] * rgb[None, :, None, None]  # [F, 3, size, size]


def render_batch(
    prompts: Sequence[str], seeds: int | Sequence[int] = 0, num_frames: int = 12, size: int = 32
) -> torch.Tensor:
    r"""
    Render the ground-truth video of each prompt.

    Args:
        prompts (`Sequence[str]`): Moving Shapes prompts (see [`parse_prompt`]).
        seeds (`int` or `Sequence[int]`, *optional*, defaults to `0`): one seed per prompt, or one seed for all.
        num_frames (`int`, *optional*, defaults to `12`): number of frames.
        size (`int`, *optional*, defaults to `32`): frame height and width in pixels.

    Returns:
        `torch.Tensor`: `[N, num_frames, 3, size, size]` float32 in `[0, 1]`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt (or one int).")
    if not prompts:
        return torch.zeros(0, num_frames, 3, size, size)
    videos = [render_video(*parse_prompt(p), seed=s, num_frames=num_frames, size=size) for p, s in zip(prompts, seeds)]
    return torch.stack(videos)  # [N, F, 3, size, size]


SPLITS = ("train", "heldout", "all")


def make_dataset(split: str = "train", repeats: int = 1) -> Dataset:
    r"""
    The prompts of one split as a [`~datasets.Dataset`], ready for `ARCoPOTrainer(train_dataset=...)`.

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` (60 prompts), `"heldout"` (12) or `"all"` (72).
        repeats (`int`, *optional*, defaults to `1`): the prompt list is repeated this many times (in order).

    Returns:
        [`~datasets.Dataset`]: columns `prompt`, `colour`, `shape` and `direction` (the extra columns reach reward
        functions as keyword lists).
    """
    from datasets import Dataset

    prompts = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS, "all": ALL_PROMPTS}.get(split)
    if prompts is None:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)}.")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    prompts = list(prompts) * repeats
    colours, shapes, directions = zip(*(parse_prompt(p) for p in prompts))
    return Dataset.from_dict(
        {"prompt": prompts, "colour": list(colours), "shape": list(shapes), "direction": list(directions)}
    )
