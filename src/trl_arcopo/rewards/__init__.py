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
Rewards: the reward-function type, how the trainer calls and combines them (`base`), and ready-made reward functions
(`video_metrics`: weight-free motion, flicker and sharpness; `clip`: CLIP score, PickScore and the LAION aesthetic
predictor on the frames), and rewards computed elsewhere (`judge`: a VLM behind an OpenAI-compatible server;
`videoalign`, `hpsv3`: the Qwen2-VL reward models VideoAlign and HPSv3, on `qwen_vl` and its inputs `qwen_vl_inputs`;
`server`: any reward function served over HTTP with FastAPI; `server_client`: its client;
`wire`: their format; `remote`: the deadline, retry and failure policy of the clients), and `registry`: every reward
by name, with its options (`load_reward_func`, for the command line, YAML and Python).
"""

from typing import TYPE_CHECKING

from ..import_utils import lazy_exports


#: module -> the names it exports here; each is imported on first use (`server` needs the optional extra `server`:
#: FastAPI and uvicorn, and `qwen_vl` Qwen2-VL's code, only for the rewards that use them)
_import_structure = {
    ".base": [
        "RewardFunc",
        "RewardScorer",
        "check_reward_funcs",
        "load_reward_func",
        "random_reward",
        "redness",
        "score_group",
    ],
    ".clip": ["AestheticReward", "CLIPScoreReward", "load_aesthetic_head"],
    ".hpsv3": ["HPSv3Reward"],
    ".judge": ["VLMJudgeReward"],
    ".qwen_vl": ["QwenVLReward", "QwenVLRewardModel"],
    ".registry": ["RewardSpec", "parse_reward_spec", "reward_names"],
    ".remote": ["RemoteReward", "RemoteRewardError"],
    ".server": ["RewardServer", "serve"],
    ".server_client": ["RewardServerClient"],
    ".server_limits": ["ServerLimits"],
    ".video_metrics": ["FlickerReward", "MotionMagnitudeReward", "SharpnessReward"],
    ".videoalign": ["VideoAlignReward"],
}

if TYPE_CHECKING:
    from .base import (
        RewardFunc,
        RewardScorer,
        check_reward_funcs,
        load_reward_func,
        random_reward,
        redness,
        score_group,
    )
    from .clip import AestheticReward, CLIPScoreReward, load_aesthetic_head
    from .hpsv3 import HPSv3Reward
    from .judge import VLMJudgeReward
    from .qwen_vl import QwenVLReward, QwenVLRewardModel
    from .registry import RewardSpec, parse_reward_spec, reward_names
    from .remote import RemoteReward, RemoteRewardError
    from .server import RewardServer, serve
    from .server_client import RewardServerClient
    from .server_limits import ServerLimits
    from .video_metrics import FlickerReward, MotionMagnitudeReward, SharpnessReward
    from .videoalign import VideoAlignReward

__getattr__, __dir__, __all__ = lazy_exports(__name__, _import_structure)
