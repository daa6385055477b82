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
"""The tiny streaming generator of the Moving Shapes world, shipped inside the package (no network needed)."""

from __future__ import annotations

import os

from ..pipelines import SelfForcingPipeline


#: Folder of the shipped `SelfForcingPipeline` (made by `examples/moving_shapes/pretrain.py`).
PRETRAINED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def load_pretrained_pipeline(path: str | None = None, **kwargs) -> SelfForcingPipeline:
    """
    Load the Moving Shapes generator: a pixel-space `SelfForcingPipeline` (32×32, 12 frames in 4 chunks of 3).

    Args:
        path (`str`, *optional*): another folder made by the pretraining script; defaults to the shipped model.
        kwargs: passed to `SelfForcingPipeline.from_pretrained`.
    """
    path = path or PRETRAINED_PATH
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"No pipeline at {path!r}: run `python examples/moving_shapes/pretrain.py` and pass its "
            "`output_dir/pipeline` folder."
        )
    pipe = SelfForcingPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
