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
`videoalign`, `hpsv3`: the Qwen2-VL reward models VideoAlign and HPSv3, on `qwen_vl`'s preprocessing;
`server`: any reward function served over HTTP with FastAPI, imported on first use; `server_client`: its client;
`wire`: their format; `remote`: the deadline, retry and failure policy of the clients), and `registry`: every reward
by name, with its options (`load_reward_func`, for the command line, YAML and Python).
"""

from .base import (
    MULTI_OBJECTIVE_AGGREGATIONS,
    GroupRewards,
    RewardFunc,
    RewardScorer,
    call_reward_funcs,
    check_reward_funcs,
    combine_rewards,
    load_reward_func,
    normalize_per_group,
    random_reward,
    redness,
    reward_func_name,
    score_group,
)
from .clip import AestheticMLP, AestheticReward, CLIPScoreReward, load_aesthetic_head
from .hpsv3 import HPSv3Reward
from .judge import VLMJudgeReward
from .qwen_vl import QwenVLReward, QwenVLRewardModel
from .registry import REWARD_FAMILIES, RewardFamily, RewardSpec, parse_reward_spec, reward_names
from .remote import RemoteReward, RemoteRewardError
from .server_client import RewardServerClient
from .server_limits import ServerLimits
from .video_metrics import FlickerReward, MotionMagnitudeReward, SharpnessReward
from .videoalign import VIDEOALIGN_CALIBRATION, VideoAlignReward, remap_videoalign_state_dict


__all__ = [
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "REWARD_FAMILIES",
    "VIDEOALIGN_CALIBRATION",
    "AestheticMLP",
    "AestheticReward",
    "CLIPScoreReward",
    "FlickerReward",
    "GroupRewards",
    "HPSv3Reward",
    "MotionMagnitudeReward",
    "QwenVLReward",
    "QwenVLRewardModel",
    "RemoteReward",
    "RemoteRewardError",
    "RewardFamily",
    "RewardFunc",
    "RewardScorer",
    "RewardServer",
    "RewardServerClient",
    "RewardSpec",
    "ServerLimits",
    "SharpnessReward",
    "VLMJudgeReward",
    "VideoAlignReward",
    "call_reward_funcs",
    "check_reward_funcs",
    "combine_rewards",
    "load_aesthetic_head",
    "load_reward_func",
    "normalize_per_group",
    "parse_reward_spec",
    "random_reward",
    "redness",
    "remap_videoalign_state_dict",
    "reward_func_name",
    "reward_names",
    "score_group",
    "serve",
]

#: Names served by `server`, imported on first use (FastAPI and uvicorn are the optional extra `server`).
_SERVER_NAMES = ("RewardServer", "serve")


def __getattr__(name: str):
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
