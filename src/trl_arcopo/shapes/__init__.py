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
"""The "Moving Shapes" world: a procedural, verifiable text-to-video task (see `docs/moving_shapes.md`)."""

from .evaluation import (
    evaluate_generator,
    format_table,
    generate_videos,
    paired_difference,
    plot_curves,
    save_video_grid,
)
from .model import CausalWanX0Transformer3DModel, shapes_text_encoder, shapes_tokenizer, teacher_forcing_mask
from .pretrained import PRETRAINED_PATH, load_pretrained_pipeline
from .report import REPORT_KEYS, REPORTED_DIFFERENCES, evaluate_main_job, heldout_samples, write_report
from .rewards import (
    VERIFIABLE_REWARDS,
    VideoAnalysis,
    all_correct,
    analyse_videos,
    colour_reward,
    combined_reward,
    direction_reward,
    prominence_reward,
    score_videos,
    shape_reward,
    temporal_quality_reward,
)
from .world import (
    ALL_PROMPTS,
    COLOURS,
    DIRECTIONS,
    HELDOUT_PROMPTS,
    PALETTE,
    SHAPES,
    TRAIN_PROMPTS,
    Motion,
    format_prompt,
    make_dataset,
    parse_prompt,
    render_batch,
    render_video,
    sample_motion,
    vocabulary,
)


#: The world's rewards by name, which `trl_arcopo.rewards.load_reward_func` resolves: registered under the entry point
#: group `trl_arcopo.rewards` in `pyproject.toml`.
REWARDS = {
    reward.__name__: reward
    for reward in (colour_reward, combined_reward, direction_reward, prominence_reward, shape_reward,
                   temporal_quality_reward)
}  # fmt: skip

__all__ = [
    "ALL_PROMPTS",
    "COLOURS",
    "DIRECTIONS",
    "HELDOUT_PROMPTS",
    "PALETTE",
    "PRETRAINED_PATH",
    "REPORTED_DIFFERENCES",
    "REPORT_KEYS",
    "REWARDS",
    "SHAPES",
    "TRAIN_PROMPTS",
    "VERIFIABLE_REWARDS",
    "CausalWanX0Transformer3DModel",
    "Motion",
    "VideoAnalysis",
    "all_correct",
    "analyse_videos",
    "colour_reward",
    "combined_reward",
    "direction_reward",
    "evaluate_generator",
    "evaluate_main_job",
    "format_prompt",
    "format_table",
    "generate_videos",
    "heldout_samples",
    "load_pretrained_pipeline",
    "make_dataset",
    "paired_difference",
    "parse_prompt",
    "plot_curves",
    "prominence_reward",
    "render_batch",
    "render_video",
    "sample_motion",
    "save_video_grid",
    "score_videos",
    "shape_reward",
    "shapes_text_encoder",
    "shapes_tokenizer",
    "teacher_forcing_mask",
    "temporal_quality_reward",
    "vocabulary",
    "write_report",
]
