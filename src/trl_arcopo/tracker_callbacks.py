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
transformers' TensorBoard and MLflow callbacks for a diffusers model. They read the model's configuration with
`model.config.to_json_string()` / `.to_dict()`, which a diffusers config (a `FrozenDict`) does not have; these
subclasses write it as JSON instead. wandb's and trackio's callbacks already accept a dict.
"""

from __future__ import annotations

import json

from transformers import Trainer
from transformers.integrations import MLflowCallback, TensorBoardCallback


def _config_json(model) -> str | None:
    """The model's config as JSON: diffusers' own serialisation (`ConfigMixin.to_json_string`, with `_class_name`)."""
    if callable(getattr(model, "to_json_string", None)):
        return model.to_json_string()
    config = getattr(model, "config", None)
    return json.dumps(dict(config), indent=2, default=str) if config is not None else None


class DiffusersTensorBoardCallback(TensorBoardCallback):
    """[`~transformers.integrations.TensorBoardCallback`] that writes a diffusers model's config as JSON text."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)  # without the model: its config is written here
        if self.tb_writer is not None and state.is_world_process_zero and (config := _config_json(model)) is not None:
            self.tb_writer.add_text("model_config", config)


class DiffusersMLflowCallback(MLflowCallback):
    """[`~transformers.integrations.MLflowCallback`] that logs a diffusers model's config as `model_config.json`."""

    def setup(self, args, state, model):
        super().setup(args, state, None)  # without the model: its config is logged here
        config = _config_json(model)
        if state.is_world_process_zero and self._ml_flow.active_run() is not None and config is not None:
            self._ml_flow.log_text(config, "model_config.json")


#: transformers' callback -> its replacement for a diffusers model.
REPLACEMENTS = {TensorBoardCallback: DiffusersTensorBoardCallback, MLflowCallback: DiffusersMLflowCallback}


def use_diffusers_tracker_callbacks(trainer: Trainer) -> None:
    """Replace the callbacks of `trainer` that cannot read a diffusers config by the subclasses above."""
    for callback in list(trainer.callback_handler.callbacks):
        replacement = REPLACEMENTS.get(type(callback))
        if replacement is not None:
            trainer.remove_callback(callback)
            trainer.add_callback(replacement)
