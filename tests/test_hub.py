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
import json
import os
from unittest.mock import patch

import pytest
import safetensors.torch
import torch
import yaml
from diffusers import WanPipeline
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from trl_arcopo.hub import ARCOPO_BIBTEX, REQUIRED_TAGS, create_model_card, push_adapter_to_hub
from trl_arcopo.lora_files import LORA_WEIGHT_NAME, load_lora_adapter_weights, save_lora_adapter
from trl_arcopo.testing_utils import tiny_pipeline, tiny_transformer


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny pipeline is latency-bound: one thread avoids contention with whatever else runs on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_config(r=4, lora_alpha=8, target_modules=TARGETS):
    return LoraConfig(r=r, lora_alpha=lora_alpha, init_lora_weights=False, target_modules=list(target_modules))


def _add_adapter(transformer, adapter_name="default", seed=0, **config_kwargs):
    torch.manual_seed(seed)
    transformer.add_adapter(_lora_config(**config_kwargs), adapter_name=adapter_name)
    return transformer


def _generate(pipe):
    return pipe("a cat runs on the beach", generator=torch.Generator().manual_seed(0), output_type="pt").frames


def _lora_state(transformer, adapter_name):
    return {
        k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()
    }


def _assert_states_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_save_and_load_roundtrip(tmp_path):
    pipe = tiny_pipeline()
    _add_adapter(pipe.transformer)
    out = tmp_path / "adapter"
    path = save_lora_adapter(pipe.transformer, out)

    assert path == os.path.join(out, LORA_WEIGHT_NAME)
    assert os.path.isfile(path)
    assert sorted(os.listdir(out)) == [LORA_WEIGHT_NAME]
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == 2 * 4 * 2 * 2  # (A, B) x 4 projections x 2 attentions x 2 blocks
    assert all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8

    # A fresh pipeline with the adapter loaded through diffusers generates exactly the same video.
    fresh = tiny_pipeline()
    base_video = _generate(fresh)
    fresh.load_lora_weights(str(out), adapter_name="arcopo")
    video = _generate(pipe)
    assert not torch.equal(video, base_video)  # the adapter does something
    assert torch.equal(_generate(fresh), video)
    assert fresh.transformer.peft_config["arcopo"].lora_alpha == 8

    # A stock WanPipeline loads the same file into its (non-causal) transformer.
    wan = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=pipe.scheduler,
        transformer=tiny_transformer(in_channels=3, causal=False),
    )
    wan.load_lora_weights(str(out), adapter_name="arcopo")
    assert wan.transformer.peft_config["arcopo"].lora_alpha == 8
    _assert_states_equal(_lora_state(wan.transformer, "arcopo"), _lora_state(pipe.transformer, "default"))


def test_named_adapter(tmp_path):
    transformer = _add_adapter(tiny_transformer(in_channels=3))
    _add_adapter(transformer, adapter_name="semi", seed=1, r=2, lora_alpha=4)
    path = save_lora_adapter(transformer, tmp_path, adapter_name="semi", weight_name="semi.safetensors")
    assert os.path.basename(path) == "semi.safetensors"

    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path), weight_name="semi.safetensors", adapter_name="semi")
    assert fresh.transformer.peft_config["semi"].r == 2
    assert fresh.transformer.peft_config["semi"].lora_alpha == 4
    _assert_states_equal(_lora_state(fresh.transformer, "semi"), _lora_state(transformer, "semi"))

    with pytest.raises(ValueError, match=r"'nope'.*'default', 'semi'"):
        save_lora_adapter(transformer, tmp_path, adapter_name="nope")
    with pytest.raises(ValueError, match="none"):
        save_lora_adapter(tiny_transformer(in_channels=3), tmp_path)
    with pytest.raises(ValueError, match="file name"):
        save_lora_adapter(transformer, tmp_path, weight_name="sub/x.safetensors")


def _zero_adapter(transformer, adapter_name):
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if f".{adapter_name}." in name and "lora_" in name:
                param.zero_()


def test_load_lora_adapter_weights_restores(tmp_path):
    transformer = _add_adapter(tiny_transformer(in_channels=3))
    _add_adapter(transformer, adapter_name="semi", seed=1)
    expected = _lora_state(transformer, "default")
    semi = _lora_state(transformer, "semi")
    save_lora_adapter(transformer, tmp_path)
    trainable = {n: p.requires_grad for n, p in transformer.named_parameters()}

    _zero_adapter(transformer, "default")
    assert not torch.equal(_lora_state(transformer, "default")[next(iter(expected))], next(iter(expected.values())))
    load_lora_adapter_weights(transformer, tmp_path)  # the folder
    _assert_states_equal(_lora_state(transformer, "default"), expected)
    _assert_states_equal(_lora_state(transformer, "semi"), semi)  # other adapters untouched
    assert {n: p.requires_grad for n, p in transformer.named_parameters()} == trainable

    # Into another adapter of the same shape, from the file itself.
    load_lora_adapter_weights(transformer, tmp_path / LORA_WEIGHT_NAME, adapter_name="semi")
    _assert_states_equal(_lora_state(transformer, "semi"), expected)


def test_load_lora_adapter_weights_mismatch(tmp_path):
    transformer = _add_adapter(tiny_transformer(in_channels=3))
    before = _lora_state(transformer, "default")

    other_rank = _add_adapter(tiny_transformer(in_channels=3), r=8, lora_alpha=8)
    save_lora_adapter(other_rank, tmp_path / "rank")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_lora_adapter_weights(transformer, tmp_path / "rank")

    fewer = _add_adapter(tiny_transformer(in_channels=3), target_modules=["to_q", "to_k"])
    save_lora_adapter(fewer, tmp_path / "fewer")
    with pytest.raises(ValueError, match=r"missing keys: .*to_v\.lora_A"):
        load_lora_adapter_weights(transformer, tmp_path / "fewer")

    other_alpha = _add_adapter(tiny_transformer(in_channels=3), lora_alpha=16)
    save_lora_adapter(other_alpha, tmp_path / "alpha")
    with pytest.raises(ValueError, match="lora_alpha=16"):
        load_lora_adapter_weights(transformer, tmp_path / "alpha")

    good = save_lora_adapter(transformer, tmp_path / "extra")
    state = safetensors.torch.load_file(good)
    state["transformer.blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(4, 24)
    state["text_encoder.foo.lora_A.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, good)
    with pytest.raises(ValueError, match="unexpected keys") as error:
        load_lora_adapter_weights(transformer, tmp_path / "extra")
    assert "transformer.blocks.9.attn1.to_q.lora_A.weight" in str(error.value)
    assert "text_encoder.foo.lora_A.weight" in str(error.value)
    assert "missing" not in str(error.value)

    with pytest.raises(ValueError, match="available adapters"):
        load_lora_adapter_weights(transformer, tmp_path / "rank", adapter_name="semi")
    with pytest.raises(FileNotFoundError):
        load_lora_adapter_weights(transformer, tmp_path / "missing")

    _assert_states_equal(_lora_state(transformer, "default"), before)  # nothing loaded on failure


def test_save_is_atomic(tmp_path, monkeypatch):
    transformer = _add_adapter(tiny_transformer(in_channels=3))
    path = save_lora_adapter(transformer, tmp_path)
    with open(path, "rb") as f:
        good = f.read()

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a truncated file...
        raise OSError("disk full")  # ...then the crash

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    _zero_adapter(transformer, "default")
    with pytest.raises(OSError, match="disk full"):
        save_lora_adapter(transformer, tmp_path)

    assert sorted(os.listdir(tmp_path)) == [LORA_WEIGHT_NAME]  # no temporary files left
    with open(path, "rb") as f:
        assert f.read() == good


def test_model_card(tmp_path):
    out = tmp_path / "my-arcopo-run"
    config = {
        "learning_rate": 1e-5,
        "num_generations": 8,
        "use_semi_on_policy": True,
        "sigmas": [1.0, 0.75, 0.5],
        "run_name": "fox: v2",
        "hub_token": "hf_secret",  # never written
        "reward_fn": object(),  # not serialisable: skipped
        "lora": {"r": 4, "lora_alpha": 8},
    }
    card = create_model_card(
        out,
        base_model="gdhe17/Self-Forcing",
        model_name="Self-Forcing AR-CoPO",
        hub_model_id="me/self-forcing-arcopo",
        training_config=config,
        tags=["lora", "video", "wan"],
        dataset_name="me/prompts",
        adapter_names=["default", "semi"],
    )
    assert sorted(os.listdir(out)) == ["README.md"]
    loaded = ModelCard.load(out / "README.md")
    assert loaded.content == card.content
    assert loaded.data.tags == [*REQUIRED_TAGS, "video", "wan"]
    assert loaded.data.base_model == "gdhe17/Self-Forcing"
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.pipeline_tag == "text-to-video"
    assert loaded.data.datasets == ["me/prompts"]
    text = loaded.text
    assert "# Self-Forcing AR-CoPO" in text
    assert "https://huggingface.co/papers/2603.17461" in text
    assert 'SelfForcingPipeline.from_pretrained("gdhe17/Self-Forcing"' in text
    assert 'pipe.load_lora_weights("me/self-forcing-arcopo")' in text
    assert "export_to_video" in text and "WanPipeline" in text
    assert "learning_rate: 1.0e-05" in text  # not `1e-05`, which YAML 1.1 parsers read as a string
    block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == {
        "learning_rate": 1e-5,
        "num_generations": 8,
        "use_semi_on_policy": True,
        "sigmas": [1.0, 0.75, 0.5],
        "run_name": "fox: v2",
        "lora": {"r": 4, "lora_alpha": 8},
    }
    assert "hf_secret" not in text and "hub_token" not in text and "reward_fn" not in text
    assert "`default`, `semi`" in text
    assert ARCOPO_BIBTEX in text and "@software{vonwerra2020trl" in text

    # No base model, no config: the repo id defaults to the folder's name.
    card = create_model_card(out, base_model=None, model_name="Bare")
    loaded = ModelCard.load(out / "README.md")
    assert loaded.data.base_model is None
    assert loaded.data.tags == REQUIRED_TAGS
    assert 'pipe.load_lora_weights("my-arcopo-run")' in loaded.text
    assert "## Training configuration" not in loaded.text
    assert sorted(os.listdir(out)) == ["README.md"]


def test_push_adapter_to_hub(tmp_path):
    (tmp_path / LORA_WEIGHT_NAME).write_bytes(b"")
    with (
        patch("huggingface_hub.HfApi.create_repo") as create_repo,
        patch("huggingface_hub.HfApi.upload_folder") as upload_folder,
    ):
        upload_folder.return_value.commit_url = "https://huggingface.co/me/repo/commit/abc"
        url = push_adapter_to_hub(tmp_path, "me/repo", private=True, commit_message="hello")
    assert url == "https://huggingface.co/me/repo/commit/abc"
    create_repo.assert_called_once()
    assert create_repo.call_args.args[0] == "me/repo"
    assert create_repo.call_args.kwargs["private"] is True and create_repo.call_args.kwargs["exist_ok"] is True
    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/repo" and kwargs["folder_path"] == str(tmp_path)
    assert kwargs["commit_message"] == "hello"
    assert kwargs["allow_patterns"] == [LORA_WEIGHT_NAME, "README.md"] and "ignore_patterns" not in kwargs

    with pytest.raises(FileNotFoundError):
        push_adapter_to_hub(tmp_path / "missing", "me/repo")
