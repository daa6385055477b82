"""Rewards by name (`trl_arcopo.rewards.registry`): every family from a name with options, on tiny models saved in the
release layouts; the YAML mapping form; the errors; the example script's and `trl-arcopo reward-server`'s parsing."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, FakeServer, load_script
from test_clip_rewards import _tiny_clip
from test_videoalign_hpsv3 import SMALL, SPECIAL, _old_key, _peft_release, _ranknet_head, _tokenizer, tiny_reward_model

from trl_arcopo import cli, shapes
from trl_arcopo.rewards import (
    AestheticReward,
    CLIPScoreReward,
    FlickerReward,
    HPSv3Reward,
    MotionMagnitudeReward,
    RewardServerClient,
    RewardSpec,
    VideoAlignReward,
    VLMJudgeReward,
    load_reward_func,
    parse_reward_spec,
    random_reward,
    redness,
)
from trl_arcopo.rewards.clip import AestheticMLP, load_aesthetic_head
from trl_arcopo.rewards.registry import AESTHETIC_HEAD, REWARD_FAMILIES


PROMPTS = ["a red fox jumps", "a dog in snow"]
VIDEOS = torch.rand(2, 9, 3, 40, 60, generator=torch.Generator().manual_seed(1))
SMALL_OPTIONS = f"min_pixels={SMALL['min_pixels']}&max_pixels={SMALL['max_pixels']}"


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Tiny models saved as released: VideoReward's folder, HPSv3.safetensors (+ a base), a CLIPModel, a LAION head."""
    root = tmp_path_factory.mktemp("releases")
    tokenizer, config, backbone, head = tiny_reward_model()

    videoalign = root / "VideoReward"  # model_config.json, config.json, checkpoint-<step>/{model.pth, tokenizer/}
    (videoalign / "checkpoint-5").mkdir(parents=True)
    torch.save(_peft_release(backbone, head), videoalign / "checkpoint-5" / "model.pth")
    tokenizer.save_pretrained(videoalign / "checkpoint-5" / "tokenizer")
    config.save_pretrained(videoalign)
    (videoalign / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": SMALL["max_pixels"], "eval_dim": ["VQ", "MQ", "TA"],
                        "num_frames": None, "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
    }))  # fmt: skip

    from safetensors.torch import save_file

    hpsv3 = root / "HPSv3"  # HPSv3.safetensors (transformers 4.45 names), and a base with Qwen2-VL's config/tokenizer
    hpsv3.mkdir()
    state = {_old_key(k): v.clone().contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"rm_head.{k}": v.clone() for k, v in _ranknet_head().state_dict().items()})
    save_file(state, hpsv3 / "HPSv3.safetensors")
    config.save_pretrained(root / "qwen2-vl")
    _tokenizer(SPECIAL[:-1]).save_pretrained(root / "qwen2-vl")

    model, clip_tokenizer = _tiny_clip()  # a CLIPModel folder with its tokenizer (CLIP score and PickScore)
    model.save_pretrained(root / "clip")
    clip_tokenizer.save_pretrained(root / "clip")
    torch.manual_seed(2)
    (root / "aesthetic").mkdir()
    torch.save(AestheticMLP(embedding_dim=16).state_dict(), root / "aesthetic" / AESTHETIC_HEAD)
    return {name: str(root / name) for name in ("VideoReward", "HPSv3", "qwen2-vl", "clip", "aesthetic")}


def _clip(path):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ each family
def test_videoalign_by_name_with_options(releases):
    path = releases["VideoReward"]
    cli_form = f"videoalign:{path}?dimensions=VQ+TA&dtype=float32&device=cpu&batch_size=1&{SMALL_OPTIONS}"
    yaml_form = {"name": "videoalign", "path": path, "dimensions": ["VQ", "TA"], "dtype": "float32", "device": "cpu",
                 "batch_size": 1, **SMALL}  # fmt: skip
    assert parse_reward_spec(cli_form) == parse_reward_spec(yaml_form)
    assert parse_reward_spec(cli_form).options["dimensions"] == ("VQ", "TA")
    assert parse_reward_spec(cli_form).options["dtype"] is torch.float32
    reward = load_reward_func(cli_form)
    assert isinstance(reward, VideoAlignReward) and reward.__name__ == "videoalign_vq_ta"
    assert reward.dimensions == ("VQ", "TA") and reward.batch_size == 1 and reward.fps == 2.0
    assert (
        reward.model.head.weight.device.type == "cpu" and next(reward.model.core.parameters()).dtype == torch.float32
    )
    direct = VideoAlignReward.from_pretrained(
        path, torch_dtype=torch.float32, device="cpu", dimensions=("VQ", "TA"), batch_size=1, **SMALL
    )
    assert reward(PROMPTS, VIDEOS) == pytest.approx(direct(PROMPTS, VIDEOS), abs=1e-6)


def test_hpsv3_by_name_with_options(releases):
    spec = (f"hpsv3:{releases['HPSv3']}?base_model={releases['qwen2-vl']}&frames=uniform&num_frames=2&dtype=float32"
            f"&device=cpu&batch_size=4&{SMALL_OPTIONS}")  # fmt: skip
    reward = load_reward_func(spec)
    assert isinstance(reward, HPSv3Reward) and reward.policy["k"] == 2 and reward.batch_size == 4
    assert (reward.min_pixels, reward.max_pixels) == (SMALL["min_pixels"], SMALL["max_pixels"])
    direct = HPSv3Reward.from_pretrained(releases["HPSv3"], torch_dtype=torch.float32, device="cpu",
                                         base_model=releases["qwen2-vl"], num_frames=2, batch_size=4, **SMALL)  # fmt: skip
    assert reward(PROMPTS, VIDEOS) == pytest.approx(direct(PROMPTS, VIDEOS), abs=1e-6)
    # the file itself is a path too
    assert parse_reward_spec(f"hpsv3:{releases['HPSv3']}/HPSv3.safetensors").options["path"].endswith(".safetensors")


def test_clip_family_by_name_with_options(releases):
    clip = releases["clip"]
    model, tokenizer = _clip(clip)
    videos = VIDEOS[..., :40]  # square frames

    clip_score = load_reward_func(f"clip_score:{clip}?num_frames=3&scale=2.5&device=cpu")
    assert isinstance(clip_score, CLIPScoreReward) and clip_score.__name__ == "clip_score"
    assert clip_score.scale == 2.5 and not clip_score.use_logit_scale and clip_score.frames.policy["k"] == 3
    expected = CLIPScoreReward(model, tokenizer, num_frames=3, scale=2.5)(PROMPTS, videos)
    assert clip_score(PROMPTS, videos) == pytest.approx(expected, abs=1e-6)

    pick = load_reward_func({"name": "pickscore", "path": clip, "frames": "first", "device": "cpu"})
    assert isinstance(pick, CLIPScoreReward) and pick.__name__ == "pick_score" and pick.use_logit_scale
    expected = CLIPScoreReward(model, tokenizer, frames="first", use_logit_scale=True)(PROMPTS, videos)
    assert pick(PROMPTS, videos) == pytest.approx(expected, abs=1e-6)
    assert "use_logit_scale" not in REWARD_FAMILIES["pickscore"].options  # PickScore is the logit scale

    head_file = os.path.join(releases["aesthetic"], AESTHETIC_HEAD)
    for path in (releases["aesthetic"], head_file):  # the folder or the file
        aesthetic = load_reward_func(f"aesthetic:{path}?clip={clip}&num_frames=3&scale=0.1&device=cpu")
        assert isinstance(aesthetic, AestheticReward) and aesthetic.scale == 0.1
        expected = AestheticReward(model, load_aesthetic_head(head_file), num_frames=3, scale=0.1)(PROMPTS, videos)
        assert aesthetic(PROMPTS, videos) == pytest.approx(expected, abs=1e-6)


def test_metrics_toys_world_and_import_paths_by_name():
    motion = load_reward_func("motion_magnitude?scale=20")
    assert isinstance(motion, MotionMagnitudeReward) and motion.scale == 20
    assert motion(PROMPTS, VIDEOS) == MotionMagnitudeReward(scale=20)(PROMPTS, VIDEOS)
    assert isinstance(load_reward_func("flicker"), FlickerReward)
    assert load_reward_func("redness") is redness and load_reward_func("random") is random_reward
    assert load_reward_func("shape_reward") is shapes.shape_reward
    assert load_reward_func("trl_arcopo.shapes.prominence_reward") is shapes.prominence_reward
    # MODULE:CALLABLE with options: a class is instantiated, a factory called; a dotted path to a class too
    built = load_reward_func("trl_arcopo.rewards.video_metrics:MotionMagnitudeReward?scale=10")
    assert isinstance(built, MotionMagnitudeReward) and built.scale == 10
    assert isinstance(load_reward_func("trl_arcopo.rewards.video_metrics.FlickerReward"), FlickerReward)
    assert load_reward_func("trl_arcopo.rewards.base:load_reward_func", name="motion_magnitude", scale=5).scale == 5


def test_judge_and_server_names_build_clients_without_contacting_anything(start, monkeypatch):
    server = start(FakeServer(lambda *_: (500, b"{}")))
    monkeypatch.setenv("MY_JUDGE_KEY", "s3cret")
    judge = load_reward_func(
        f"judge:{server.url}/v1?model=Qwen/Qwen3-VL-8B-Instruct&score_range=[0,10]&num_frames=2&timeout=5"
        "&max_retries=1&api_key_env=MY_JUDGE_KEY&prompt_template=Rate {prompt} from 0 to 10%3F&name=qwen_judge"
    )
    assert isinstance(judge, VLMJudgeReward) and judge.__name__ == "qwen_judge"
    assert judge.url == f"{server.url}/v1/chat/completions" and judge.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert judge.score_range == (0.0, 10.0) and judge.policy["k"] == 2 and judge.timeout == 5.0
    assert (
        judge.max_retries == 1
        and judge._api_key == "s3cret"
        and judge.prompt_template == "Rate {prompt} from 0 to 10?"
    )
    two = f"{server.url},http://127.0.0.1:9"
    client = load_reward_func(f"server:{two}?name=videoalign&batch_size=4&timeout=120&on_failure=raise")
    assert isinstance(client, RewardServerClient) and client.urls == [server.url, "http://127.0.0.1:9"]
    assert client.__name__ == "videoalign" and client.batch_size == 4 and client.timeout == 120.0
    assert client.on_failure == "raise"
    assert parse_reward_spec({"name": "server", "url": [server.url, "http://127.0.0.1:9"]}) == parse_reward_spec(
        f"server:{two}"
    )
    assert server.requests == []  # nothing was contacted
    # a URL holds ':' (and a judge's query '?' goes in as an option, percent-encoded)
    spec = parse_reward_spec("judge:?base_url=http://h:8000/v1%3Fkey%3D1&model=m")
    assert spec.options["base_url"] == "http://h:8000/v1?key=1"


# ------------------------------------------------------------------------------------------------ forms and errors
def test_yaml_mapping_form_equals_the_cli_form(releases):
    pairs = [
        ("motion_magnitude?scale=20", {"name": "motion_magnitude", "scale": 20}),
        ("flicker", {"name": "flicker"}),
        ("judge:http://localhost:8000/v1?model=m&score_range=null&temperature=0.5&extra_body={\"seed\": 1}",
         {"name": "judge", "base_url": "http://localhost:8000/v1", "model": "m", "score_range": None,
          "temperature": 0.5, "extra_body": {"seed": 1}}),
        ("server:http://a:8000,http://b:8001?max_retries=0",
         {"name": "server", "url": ["http://a:8000", "http://b:8001"], "max_retries": 0}),
        (f"videoalign:{releases['VideoReward']}?dimensions=MQ&normalize=false&load_in_8bit=true&calibration="
         + '{"MQ": [1, 2]}',
         {"name": "videoalign", "path": releases["VideoReward"], "dimensions": "MQ", "normalize": False,
          "load_in_8bit": True, "calibration": {"MQ": [1.0, 2.0]}}),
        (f"pickscore:{releases['clip']}?mean=[0.5,0.5,0.5]&image_size=32",
         {"name": "pickscore", "path": releases["clip"], "mean": [0.5, 0.5, 0.5], "image_size": 32}),
        ("trl_arcopo.rewards.video_metrics:MotionMagnitudeReward?scale=2",
         {"name": "trl_arcopo.rewards.video_metrics:MotionMagnitudeReward", "scale": 2}),
    ]  # fmt: skip
    for text, mapping in pairs:
        assert parse_reward_spec(text) == parse_reward_spec(mapping), text
        assert parse_reward_spec(json.dumps(mapping)) == parse_reward_spec(mapping)  # a JSON object is the mapping
    # keywords add to a name and override its options; without a name they are the mapping
    assert parse_reward_spec("motion_magnitude?scale=3", scale=20) == parse_reward_spec("motion_magnitude?scale=20")
    assert parse_reward_spec(name="sharpness", scale=2) == RewardSpec("sharpness", {"scale": 2.0})


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown reward 'videoalgin'. Did you mean 'videoalign'?") as info:
        load_reward_func("videoalgin")
    for name in [*REWARD_FAMILIES, "prominence_reward", "MODULE:CALLABLE"]:
        assert repr(name) in str(info.value) or name in str(info.value)
    with pytest.raises(ValueError, match="'random'"):
        load_reward_func("no_such_reward")
    with pytest.raises(ValueError, match="Cannot import the module 'videoalgn'.*Did you mean the reward 'videoalign'"):
        parse_reward_spec("videoalgn:checkpoints/VideoReward")  # refused before anything loads


def test_missing_path_is_named_with_the_reward(releases, tmp_path):
    for spec, path in [
        ("pickscore:/no/such/dir", "/no/such/dir"),
        ({"name": "videoalign", "path": str(tmp_path / "VideoReward")}, str(tmp_path / "VideoReward")),
        (f"hpsv3:{tmp_path}/HPSv3.safetensors", f"{tmp_path}/HPSv3.safetensors"),
        (f"aesthetic:{tmp_path}/head.pth?clip={releases['clip']}", f"{tmp_path}/head.pth"),
        (f"aesthetic:{releases['aesthetic']}?clip=./no/clip", "./no/clip"),
    ]:
        with pytest.raises(FileNotFoundError) as info:
            load_reward_func(spec)
        message = str(info.value)
        name = spec["name"] if isinstance(spec, dict) else spec.partition(":")[0]
        assert f"Reward {name!r}" in message and repr(path) in message and "Unknown reward" not in message
    with pytest.raises(ValueError, match=r"Reward 'videoalign' needs a path, the folder of the VideoReward release"):
        load_reward_func("videoalign")
    # a Hub id that cannot be loaded (offline here) names the reward
    with pytest.raises(OSError, match="Reward 'clip_score': .*someone/not-downloaded"):
        load_reward_func("clip_score:someone/not-downloaded?device=cpu")


def test_unknown_option_and_bad_values_are_refused(releases):
    path = releases["VideoReward"]
    with pytest.raises(ValueError, match="Reward 'videoalign' has no option 'dimension'; its options are: path, dimensions"):  # fmt: skip
        load_reward_func(f"videoalign:{path}?dimension=VQ")
    with pytest.raises(ValueError, match="Reward 'redness' has no option 'scale'; its options are: none"):
        load_reward_func({"name": "redness", "scale": 2})
    with pytest.raises(ValueError, match="Reward 'shape_reward' has no option 'x'"):
        load_reward_func("shape_reward?x=1")
    for spec, message in [
        (f"videoalign:{path}?dimensions=VQ+XX", "option dimensions='VQ+XX' is not valid: expected distinct names"),
        (f"videoalign:{path}?batch_size=0", "option batch_size='0' is not valid: expected an integer >= 1"),
        (f"videoalign:{path}?dtype=float64", "expected one of 'float32', 'bfloat16', 'float16'"),
        ("judge:ftp://h?model=m", "option base_url='ftp://h' is not valid: expected an http(s) URL"),
        ("judge:http://h/v1", "Reward 'judge' needs the option 'model'"),
        ("motion_magnitude?scale", "the option 'scale' is not KEY=VALUE"),
        ("motion_magnitude?scale=1&scale=2", "gives the option 'scale' twice"),
        (f"videoalign:{path}?path={path}", "gives 'path' twice"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            load_reward_func(spec)


def test_a_missing_package_names_the_pip_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openai" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"Reward 'judge' needs the `openai` package: pip install \"trl_arcopo\[judge\]\""):  # fmt: skip
        load_reward_func("judge:http://localhost:8000/v1?model=m")


def test_resolving_light_names_imports_no_reward_model_code():
    """`redness`, the metrics, the judge and the server client resolve without Qwen2-VL, CLIP or openai code."""
    code = (
        "import sys, types\n"
        "for name in ('trl_arcopo', 'trl_arcopo.rewards'):\n"  # the registry alone, not the package's other imports
        "    module = types.ModuleType(name)\n"
        f"    module.__path__ = [{os.path.join(ROOT, 'src')!r} + '/' + name.replace('.', '/')]\n"
        "    sys.modules[name] = module\n"
        "from trl_arcopo.rewards.registry import load_reward_func\n"
        "for name in ('redness', 'random', 'motion_magnitude?scale=2', 'flicker', 'sharpness',\n"
        "             'judge:http://127.0.0.1:9/v1?model=m', 'server:http://127.0.0.1:9?name=s'):\n"
        "    load_reward_func(name)\n"
        "heavy = ('qwen2_vl', 'models.clip', 'openai', 'rewards.qwen_vl', 'rewards.videoalign', 'rewards.hpsv3',\n"
        "         'rewards.clip')\n"
        "print([m for m in sys.modules if any(h in m for h in heavy)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ the example script
def test_example_script_turns_cli_and_yaml_forms_into_the_same_rewards(releases, tmp_path):
    from trl import TrlParser

    from trl_arcopo import ARCoPOConfig

    module = load_script(os.path.join(ROOT, "examples", "train_arcopo.py"))
    clip = releases["clip"]
    config = tmp_path / "rewards.yaml"
    config.write_text(yaml.safe_dump({
        "pipeline_name_or_path": "tiny-random",
        "reward_funcs": [{"name": "clip_score", "path": clip, "num_frames": 3, "device": "cpu"},
                         {"name": "motion_magnitude", "scale": 20}, "redness",
                         {"name": "judge", "base_url": "http://127.0.0.1:9/v1", "model": "m", "score_range": [0, 5]}],
        "reward_weights": [1.0, 0.5, 0.5, 1.0],
    }))  # fmt: skip
    parsed = []
    for args in (
        ["--config", str(config)],
        ["--pipeline_name_or_path", "tiny-random", "--reward_weights", "1.0", "0.5", "0.5", "1.0", "--reward_funcs",
         f"clip_score:{clip}?num_frames=3&device=cpu", "motion_magnitude?scale=20", "redness",
         "judge:http://127.0.0.1:9/v1?model=m&score_range=[0,5]"],
    ):  # fmt: skip
        parser = TrlParser((module.ScriptArguments, ARCoPOConfig, module.LoraArguments))
        script_args, training_args, _ = parser.parse_args_and_config(args=[*args, "--output_dir", str(tmp_path)])
        assert training_args.reward_weights == [1.0, 0.5, 0.5, 1.0]
        parsed.append(module.reward_specs(script_args.reward_funcs, world=False))
    assert parsed[0] == parsed[1]
    assert [s.name for s in parsed[0]] == ["clip_score", "motion_magnitude", "redness", "judge"]
    built = [[spec.build() for spec in specs] for specs in parsed]
    videos = VIDEOS[..., :40]
    for yaml_reward, cli_reward in zip(*built):
        assert type(yaml_reward) is type(cli_reward)
        if not isinstance(yaml_reward, VLMJudgeReward):
            assert yaml_reward(PROMPTS, videos) == cli_reward(PROMPTS, videos)
    assert built[0][2] is redness and built[0][3].score_range == built[1][3].score_range == (0.0, 5.0)
    # without --reward_funcs: the world's rewards (the main job's path), or redness on another generator
    assert [s.build() for s in module.reward_specs(None, world=True)] == [
        getattr(shapes, n) for n in shapes.VERIFIABLE_REWARDS
    ]
    assert [s.build() for s in module.reward_specs(None, world=False)] == [redness]
    with pytest.raises(ValueError, match="has no option 'scael'"):
        module.reward_specs(["motion_magnitude?scael=2"], world=False)  # refused before any model loads


def test_self_forcing_config_names_the_papers_reward(releases, tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "examples", "configs", "self_forcing.yaml")) as f:
        entries = yaml.safe_load(f)["reward_funcs"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Reward 'videoalign' \(path\): no file or folder at 'checkpoints/VideoReward'"):  # fmt: skip
        parse_reward_spec(entries[0])
    os.makedirs("checkpoints")
    os.symlink(releases["VideoReward"], "checkpoints/VideoReward")
    specs = [parse_reward_spec(entry) for entry in entries]
    cli_form = "videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA&dtype=bfloat16&batch_size=4"  # its comment's
    assert specs == [parse_reward_spec(cli_form)]
    assert specs[0].options["dimensions"] == ("VQ", "MQ", "TA") and specs[0].options["dtype"] is torch.bfloat16
    reward = load_reward_func(entries[0], min_pixels=SMALL["min_pixels"])  # the tiny release's frames are smaller
    assert isinstance(reward, VideoAlignReward) and reward.__name__ == "videoalign" and reward.batch_size == 4
    assert next(reward.model.core.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ trl-arcopo reward-server
def test_reward_server_takes_names_with_options(monkeypatch, capsys):
    from trl_arcopo.rewards import server as server_module

    served = []

    class Recorded(server_module.RewardServer):
        def __init__(self, reward_func, *args, **kwargs):
            super().__init__(reward_func, *args, **kwargs)
            self.reward_func = reward_func

        def run(self):  # served: record it, close the socket
            served.append(self)
            self.server_close()

    monkeypatch.setattr(server_module, "RewardServer", Recorded)
    cli.main(["reward-server", "motion_magnitude?scale=10", "--port", "0"])
    cli.main(["reward-server", "motion_magnitude", "--kwargs", '{"scale": 10}', "--port", "0"])
    assert len(served) == 2
    for server in served:
        assert isinstance(server.reward_func, MotionMagnitudeReward) and server.reward_func.scale == 10
    assert "Serving reward `motion_magnitude`" in capsys.readouterr().out
    assert isinstance(cli.load_callable("flicker"), FlickerReward)
    for spec, message in [
        ("pickscore:/no/such/dir", "Reward 'pickscore' (path): no file or folder at '/no/such/dir'"),
        ("motion_magnitude?speed=2", "Reward 'motion_magnitude' has no option 'speed'; its options are: scale"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["reward-server", spec, "--port", "0"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
