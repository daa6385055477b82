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
"""AR-CoPO for streaming autoregressive video generators, in TRL's conventions."""

from typing import TYPE_CHECKING

from . import dependency_logging  # first: its log filters are in place before any dependency is imported
from .import_utils import lazy_exports


__version__ = "0.1.0.dev0"

#: module -> the names it exports here; each is imported on first use (`import trl_arcopo` imports none of them)
_import_structure = {
    ".arcopo_config": ["ARCoPOConfig"],
    ".arcopo_trainer": ["ARCoPOTrainer"],
    ".generator": ["StreamingGenerator", "StreamingGeneratorMixin"],
    ".loss": ["LossStrategy", "register_loss"],
    ".merging": ["combine_adapters"],
    ".models": ["CausalWanTransformer3DModel"],
    ".pipelines": ["SelfForcingPipeline", "SelfForcingPipelineOutput"],
    ".rewards": ["RewardFunc", "load_reward_func"],
    ".rollout": ["ForkedRollout", "RolloutSpec", "forked_rollout", "sample_group"],
    ".rollout_group": ["AnchorBatch", "RolloutGroup"],
    ".sampling": ["RolloutNoise", "neighbor_noise"],
}

if TYPE_CHECKING:
    from .arcopo_config import ARCoPOConfig
    from .arcopo_trainer import ARCoPOTrainer
    from .generator import StreamingGenerator, StreamingGeneratorMixin
    from .loss import LossStrategy, register_loss
    from .merging import combine_adapters
    from .models import CausalWanTransformer3DModel
    from .pipelines import SelfForcingPipeline, SelfForcingPipelineOutput
    from .rewards import RewardFunc, load_reward_func
    from .rollout import ForkedRollout, RolloutSpec, forked_rollout, sample_group
    from .rollout_group import AnchorBatch, RolloutGroup
    from .sampling import RolloutNoise, neighbor_noise

__getattr__, __dir__, __all__ = lazy_exports(__name__, _import_structure)
