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
The paper's table in miniature: alignment methods on the Moving Shapes world at equal compute.

    python benchmarks/moving_shapes.py                       # all methods, seeds 0 1 2, writes docs/benchmarks/
    python benchmarks/moving_shapes.py --methods arcopo sde_grpo --seeds 0 --budget 20000

Every method starts from the shipped Moving Shapes generator with a fresh LoRA and trains on the 60 RL-training prompts
with the four verifiable rewards (colour, shape, direction, temporal quality) until it has spent the same budget of
transformer chunk-forwards (a forward on a batch of n chunks counts n; rollouts, buffer collection, updates and
reference passes all count; evaluation does not). Every group forks at `--pivot_chunk` (default 0: the first chunk,
which decides this world's shape and direction; `none` draws it uniformly, as the paper does). Methods:

- `base`: the shipped model, no training;
- `arcopo`: AR-CoPO on-policy (forked rollouts, neighbour noise at one chunk, contrastive clipped loss);
- `sde_grpo`: the SDE-GRPO baseline on the same sampler (shared initial noise, candidates differ in the pivot chunk's
  re-noise, Gaussian log-probability ratio);
- `semi`: AR-CoPO semi-on-policy (a buffer of reference rollouts, `π_old` = reference, ratio clip as trust region);
- `merged@s`: the `semi` adapter plus `s` times the `arcopo` adapter of the same seed (its compute is the sum);
- `no_clip`: the off-policy ablation, `semi` without the ratio clip.

Evaluation: fresh seeds, `--eval_train_seeds` videos per training prompt and `--eval_heldout_seeds` per held-out
prompt (the same noises for every method). During training, every `--eval_every` steps, the combined reward of one
video for each of the first `--curve_prompts` training prompts (the same noises at every point) gives the
reward-versus-forward-passes curves. The defaults run all methods over 3 seeds in about 40 minutes on 2 CPU cores
(39.3 min measured alone).
Each finished training run is saved (`work_dir/METHOD-seedN/result.json`, atomically) and reused by a later
invocation with the same settings, so an interrupted benchmark resumes where it stopped. Output: `results.json`, `results.md` (mean ± std over seeds) and
`reward_vs_forwards.png` in `--output_dir`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import time
import warnings

from peft import LoraConfig
from transformers import TrainerCallback

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.arcopo_trainer import DEFAULT_LORA_TARGETS
from trl_arcopo.merging import combine_adapters
from trl_arcopo.shapes import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    colour_reward,
    direction_reward,
    evaluate_generator,
    load_pretrained_pipeline,
    make_dataset,
    plot_curves,
    shape_reward,
    temporal_quality_reward,
)
from trl_arcopo.shapes.pretrained import PRETRAINED_PATH


TRAINED = ("arcopo", "sde_grpo", "semi", "no_clip")
MERGE_SCALES = (0.4, 0.6, 0.8, 1.0)
COLUMNS = [
    ("train reward", "train", "combined"),
    ("train colour", "train", "colour_acc"),
    ("train shape", "train", "shape_acc"),
    ("train direction", "train", "direction_acc"),
    ("train all-correct", "train", "all_correct"),
    ("held-out colour", "heldout", "colour_acc"),
    ("held-out shape", "heldout", "shape_acc"),
    ("held-out direction", "heldout", "direction_acc"),
    ("held-out all-correct", "heldout", "all_correct"),
    ("held-out reward", "heldout", "combined"),
    ("temporal quality", "heldout", "temporal_quality"),
]


class ForwardCounter:
    """Counts transformer chunk-forwards (batch size of every call) while `active`."""

    def __init__(self, transformer):
        self.count = 0
        self.active = True
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.active:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.count += hidden.shape[0]


class BudgetAndCurve(TrainerCallback):
    """Stops at the forward budget; evaluates the training reward every `eval_every` steps (not counted)."""

    def __init__(self, counter, pipeline, budget, eval_every, prompts, seed):
        self.counter, self.pipeline, self.budget = counter, pipeline, budget
        self.eval_every, self.prompts, self.seed = eval_every, prompts, seed
        self.curve = []

    def evaluate(self):
        self.counter.active = False
        result = evaluate_generator(self.pipeline, self.prompts, 1, seed=self.seed)
        self.counter.active = True
        self.curve.append((self.counter.count, result["combined"]["mean"]))

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        done = self.counter.count >= self.budget
        if done or state.global_step % self.eval_every == 0:
            self.evaluate()
        control.should_training_stop = done
        return control


def config_for(method, seed, output_dir, args):
    common = dict(
        output_dir=output_dir,
        max_steps=10_000,  # the forward budget stops training
        lr_scheduler_type="constant",
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        num_anchors=args.num_anchors,
        num_iterations=2,
        pivot_chunk=args.pivot_chunk,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
    )
    if method == "sde_grpo":  # it explores through the re-noise of Self-Forcing's consistency sampler
        common.update(loss_type="sde_grpo", sampler="consistency")
    if method in ("semi", "no_clip"):
        # each run collects its own buffer (in its output_dir), so the collection is charged to its budget
        common.update(training_mode="semi_on_policy", replay_buffer_size=args.buffer_size)
    if method == "semi":
        # the reference never moves in this mode: the two-sided clip stops a drifting ratio from blowing up the update
        common.update(delta=args.delta)
    if method == "no_clip":
        common.update(ratio_clip=False)
    return ARCoPOConfig(**common)


def evaluate(pipeline, seed, args):
    # fresh seeds (training uses `seed`; evaluation sets start at 10_000)
    return {
        "train": evaluate_generator(pipeline, TRAIN_PROMPTS, args.eval_train_seeds, seed=10_000 + seed),
        "heldout": evaluate_generator(pipeline, HELDOUT_PROMPTS, args.eval_heldout_seeds, seed=10_000 + seed),
    }


def run_settings(args):
    """The arguments a finished run depends on (a run is reused only when they are unchanged)."""
    keys = ("budget", "batch_size", "num_generations", "num_anchors", "buffer_size", "learning_rate", "delta")
    keys += (
        "pivot_chunk",
        "lora_r",
        "eval_every",
        "curve_prompts",
        "eval_train_seeds",
        "eval_heldout_seeds",
        "pipeline_path",
    )
    settings = {k: getattr(args, k) for k in keys}
    settings["model_sha256"] = model_fingerprint(args.pipeline_path or PRETRAINED_PATH)
    return settings


@functools.cache
def model_fingerprint(path: str) -> str:
    """SHA-256 of the pipeline's transformer weights: a run made on another model (e.g. a re-shipped one) is not reused."""
    digest = hashlib.sha256()
    with open(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_one(method, seed, args):
    done = os.path.join(args.work_dir, f"{method}-seed{seed}", "result.json")
    if os.path.exists(done):  # finished by an earlier invocation with the same work_dir: reuse it
        with open(done) as f:
            run = json.load(f)
        if run.get("settings") != run_settings(args):
            raise ValueError(
                f"{done} was made with other settings ({run.get('settings')}); delete {args.work_dir} or pass another "
                "--work_dir to rerun."
            )
        return run
    pipeline = load_pretrained_pipeline(args.pipeline_path)
    counter = ForwardCounter(pipeline.transformer)
    output_dir = os.path.join(args.work_dir, f"{method}-seed{seed}")
    # the curve: one video for each of the first `curve_prompts` training prompts, the same noises at every point
    curve_prompts = TRAIN_PROMPTS[: args.curve_prompts]
    curve_cb = BudgetAndCurve(counter, pipeline, args.budget, args.eval_every, curve_prompts, seed=20_000 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_for(method, seed, output_dir, args)
    trainer = ARCoPOTrainer(
        pipeline=pipeline,
        reward_funcs=[colour_reward, shape_reward, direction_reward, temporal_quality_reward],
        args=config,
        train_dataset=make_dataset("train"),
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=DEFAULT_LORA_TARGETS),
        callbacks=[curve_cb],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    counter.active = False
    trainer.save_model(output_dir)
    run = {
        "method": method,
        "seed": seed,
        "forwards": counter.count,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "curve": curve_cb.curve,
        "eval": evaluate(pipeline, seed, args),
        "adapter": output_dir,
        "rollout_counts": dict(trainer.rollout_counts),
        "settings": run_settings(args),
    }
    with open(done + ".tmp", "w") as f:
        json.dump(run, f)
    os.replace(done + ".tmp", done)
    return run


def merged_one(scale, seed, runs, args):
    semi = next(r for r in runs if r["method"] == "semi" and r["seed"] == seed)
    on = next(r for r in runs if r["method"] == "arcopo" and r["seed"] == seed)
    pipeline = load_pretrained_pipeline(args.pipeline_path)
    pipeline.load_lora_weights(semi["adapter"], adapter_name="semi")
    pipeline.load_lora_weights(on["adapter"], adapter_name="on_policy")
    combine_adapters(pipeline, "semi", "on_policy", scale=scale)
    start = time.perf_counter()
    result = evaluate(pipeline, seed, args)
    return {
        "method": f"merged@{scale}",
        "seed": seed,
        "forwards": semi["forwards"] + on["forwards"],
        "steps": semi["steps"] + on["steps"],
        "seconds": semi["seconds"] + on["seconds"] + time.perf_counter() - start,
        "curve": [],
        "eval": result,
    }


def summarise(runs, methods):
    def cell(values, digits=3):
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    header = ["method", *[c[0] for c in COLUMNS], "forward passes", "wall-clock (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        cells = [cell([r["eval"][split][key]["mean"] for r in rows]) for _, split, key in COLUMNS]
        forwards = cell([float(r["forwards"]) for r in rows], 0)
        seconds = cell([r["seconds"] for r in rows], 0)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {forwards} | {seconds} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", *TRAINED, "merged"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=12000, help="Transformer chunk-forwards per training run.")
    parser.add_argument("--batch_size", type=int, default=2, help="Prompts per step.")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--num_anchors", type=int, default=2)
    parser.add_argument("--buffer_size", type=int, default=16, help="Semi-on-policy buffer (groups).")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--delta", type=float, default=3.0, help="Two-sided clip of the semi-on-policy runs.")
    parser.add_argument(
        "--pivot_chunk",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=0,
        help="Chunk where every group forks ('none': uniform, as in the paper). Shape and direction are decided in "
        "the first chunk of this world, so 0 (as in the main job).",
    )
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--eval_every", type=int, default=12, help="Steps between points of the reward curve.")
    parser.add_argument("--curve_prompts", type=int, default=12, help="Training prompts scored at each curve point.")
    parser.add_argument("--eval_train_seeds", type=int, default=1, help="Final evaluation: videos per train prompt.")
    parser.add_argument(
        "--eval_heldout_seeds", type=int, default=4, help="Final evaluation: videos per held-out prompt."
    )
    parser.add_argument("--pipeline_path", default=None, help="A pretraining output instead of the shipped model.")
    parser.add_argument("--work_dir", default="outputs/benchmark_moving_shapes")
    parser.add_argument("--output_dir", default="docs/benchmarks/moving_shapes")
    args = parser.parse_args()
    if "merged" in args.methods and not {"semi", "arcopo"} <= set(args.methods):
        parser.error("`merged` needs the `semi` and `arcopo` methods in --methods.")
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    total_start = time.perf_counter()

    runs = []
    if "base" in args.methods:
        pipeline = load_pretrained_pipeline(args.pipeline_path)
        start = time.perf_counter()
        for seed in args.seeds:
            result = evaluate(pipeline, seed, args)
            runs.append(dict(method="base", seed=seed, forwards=0, steps=0, seconds=0.0, curve=[], eval=result))
        print(f"base evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    for method in (m for m in TRAINED if m in args.methods):
        for seed in args.seeds:
            run = train_one(method, seed, args)
            runs.append(run)
            print(
                f"{method} seed {seed}: {run['steps']} steps, {run['forwards']} forwards, {run['seconds']:.0f} s, "
                f"held-out reward {run['eval']['heldout']['combined']['mean']:.3f}, "
                f"train reward {run['eval']['train']['combined']['mean']:.3f}",
                flush=True,
            )
    methods = ["base", *TRAINED]
    if "merged" in args.methods:
        for scale in MERGE_SCALES:
            methods.append(f"merged@{scale}")
            for seed in args.seeds:
                runs.append(merged_one(scale, seed, runs, args))

    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": [{k: v for k, v in r.items() if k != "adapter"} for r in runs]}, f)
    table = summarise(runs, methods)
    total = time.perf_counter() - total_start
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + f"\n\nmean ± std over seeds {args.seeds}; total wall-clock {total / 60:.1f} min.\n")
    print(table)

    curves = {}
    for method in TRAINED:
        rows = [r for r in runs if r["method"] == method and r["curve"]]
        if not rows:
            continue
        length = min(len(r["curve"]) for r in rows)
        x = [statistics.mean(r["curve"][i][0] for r in rows) for i in range(length)]
        ys = [[r["curve"][i][1] for r in rows] for i in range(length)]
        y = [statistics.mean(v) for v in ys]
        y_std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
        curves[method] = (x, y, y_std)
    if curves:
        plot_curves(
            os.path.join(args.output_dir, "reward_vs_forwards.png"),
            curves,
            "transformer chunk-forwards",
            "combined reward, training prompts (fresh seeds)",
            "Moving Shapes: reward vs compute",
        )
    print(f"total {total / 60:.1f} min; results in {args.output_dir}")
    if os.path.isdir(args.work_dir) and os.environ.get("ARCOPO_BENCH_CLEAN"):
        shutil.rmtree(args.work_dir)


if __name__ == "__main__":
    main()
