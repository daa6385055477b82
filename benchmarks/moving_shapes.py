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
The paper's Fig. 2 and Table 2/3 in miniature, on the Moving Shapes world, around its preference reward (subject
prominence, `trl_arcopo.shapes.prominence_reward`).

    python benchmarks/moving_shapes.py                     # every method, seeds 0 1 2, writes docs/benchmarks/
    python benchmarks/moving_shapes.py --methods arcopo_consistency sde_grpo --seeds 0 --budget 8000

Every method starts from the shipped generator with a fresh LoRA and takes the main job's configuration
(`examples/configs/moving_shapes.yaml`: prompts per step, G, anchors, inner updates, learning rate, pivot, LoRA rank)
with the changes listed below. It trains until it has spent `--budget` transformer chunk-forwards (a forward on a batch
of n chunks counts n; rollouts, buffer collection, updates and reference passes all count; evaluation does not). The
budget, not a step count, ends training, so the learning rate's linear decay (over `max_steps=10000`) leaves it within
1 % of its start.

Fig. 2 analog, the preference alone, no KL penalty, reward versus forward passes:
- `arcopo_consistency`: AR-CoPO on Self-Forcing's consistency sampler (the sampler SDE-GRPO needs);
- `sde_grpo`: the SDE-GRPO baseline on the same sampler (shared initial noise, candidates differ in the pivot chunk's
  re-noise, Gaussian log-probability ratio);
- `arcopo`: AR-CoPO on the ODE sampler (the shipped model's default).

Table 2/3 analog:
- `base`: the shipped model, no training;
- `arcopo`: the preference alone, on-policy: the reward hack;
- `arcopo_dual`: the main job's rewards and settings (the preference next to colour, shape, direction and temporal
  quality, KL penalty), on-policy;
- `semi_dual`: the same rewards semi-on-policy (a buffer of `--buffer_size` reference groups, `π_old` = reference,
  two-sided ratio clip `--delta`, no KL penalty: the reference is the trust region);
- `semi_dual_wide`: the same with the ratio clip widened to `1 ± --wide_epsilon` (the main job's `1e-4` keeps the
  semi-on-policy adapter next to the reference);
- `merged@s`: the `semi_dual` adapter plus `s` times the `arcopo_dual` adapter of the same seed (compute: the sum).

Evaluation: held-out prompts, fresh seeds (`--eval_seeds` videos per prompt, the same noises for every method), with
the sampler the method trained on. Curves: every `--eval_every` chunk-forwards the held-out preference of `--curve_seeds`
videos per held-out prompt (the same noises at every point). Each finished training run is saved
(`work_dir/METHOD-seedN/result.json`, atomically) and reused by a later invocation with the same settings, so an
interrupted benchmark resumes where it stopped. Output in `--output_dir`: `results.json`, `results.md` (mean ± std over
seeds), `preference_vs_forwards.png` (Fig. 2) and `dual_criterion.png` (Table 2/3).
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
from dataclasses import dataclass

import yaml
from peft import LoraConfig
from transformers import TrainerCallback

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.merging import combine_adapters
from trl_arcopo.policy import DEFAULT_LORA_TARGETS
from trl_arcopo.shapes import (
    HELDOUT_PROMPTS,
    evaluate_generator,
    load_pretrained_pipeline,
    make_dataset,
    plot_curves,
    prominence_reward,
)
from trl_arcopo.shapes import rewards as shapes_rewards
from trl_arcopo.shapes.pretrained import PRETRAINED_PATH


MAIN_JOB_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "configs", "moving_shapes.yaml")
#: The main job's settings the benchmark takes (everything else is the benchmark's own).
MAIN_JOB_KEYS = (
    "per_device_train_batch_size",
    "num_generations",
    "num_anchors",
    "num_iterations",
    "learning_rate",
    "pivot_chunk",
    "train_denoising_steps",
    "lora_r",
    "lora_alpha",
)
MERGE_SCALES = (0.4, 0.6, 0.8, 1.0)
COLUMNS = [  # (title, result key), all on held-out prompts
    ("preference", "prominence"),
    ("all-correct", "all_correct"),
    ("temporal quality", "temporal_quality"),
    ("combined", "combined"),
]


@dataclass(frozen=True)
class Method:
    title: str
    dual: bool  # the main job's rewards, weights and KL penalty; else the preference alone without a penalty
    loss_type: str = "arcopo"
    sampler: str | None = None  # None: the pipeline's default (ODE for the shipped model)
    semi_on_policy: bool = False
    wide: bool = False  # ratio clip `1 ± --wide_epsilon` instead of the main job's epsilon


METHODS = {
    "arcopo": Method("AR-CoPO, preference alone (on-policy, ODE)", dual=False),
    "arcopo_consistency": Method("AR-CoPO, preference alone (consistency sampler)", dual=False, sampler="consistency"),
    "sde_grpo": Method(
        "SDE-GRPO, preference alone (consistency sampler)", dual=False, loss_type="sde_grpo", sampler="consistency"
    ),
    "arcopo_dual": Method("AR-CoPO, preference + text alignment + quality (on-policy, the main job)", dual=True),
    "semi_dual": Method(
        "AR-CoPO semi-on-policy, preference + text alignment + quality", dual=True, semi_on_policy=True
    ),
    "semi_dual_wide": Method(
        "the same semi-on-policy with a wider ratio clip (`--wide_epsilon`)", dual=True, semi_on_policy=True, wide=True
    ),
}
FIG2 = ("arcopo_consistency", "sde_grpo", "arcopo")
TITLES = {
    "base": "the shipped model (ODE sampler)",
    "base_consistency": "the shipped model (consistency sampler)",
    **{f"merged@{s}": f"semi_dual + {s} × arcopo_dual" for s in MERGE_SCALES},
}


@functools.cache
def _read_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def main_job_settings(path=MAIN_JOB_CONFIG):
    """The main job's YAML: the shared settings, and its reward names, weights and KL penalty for the dual runs."""
    config = _read_yaml(path)  # read once per invocation; the dicts below are fresh copies
    shared = {k: config[k] for k in MAIN_JOB_KEYS if k in config}
    names = config.get("reward_funcs") or ["prominence_reward"]
    dual = {"reward_funcs": names, "reward_weights": config.get("reward_weights"), "beta": config.get("beta", 0.0)}
    return shared, dual


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
    """
    Stops at the forward budget; scores the held-out preference (not counted) at the start, after the first step past
    every multiple of `eval_every` chunk-forwards, and at the end: the same grid of compute for every method.
    """

    def __init__(self, counter, pipeline, budget, eval_every, num_seeds, seed, sampler):
        self.counter, self.pipeline, self.budget = counter, pipeline, budget
        self.eval_every, self.num_seeds, self.seed, self.sampler = eval_every, num_seeds, seed, sampler
        self.next_eval = eval_every
        self.curve = []  # (forwards, held-out preference)

    def evaluate(self):
        self.counter.active = False
        result = evaluate_generator(
            self.pipeline, HELDOUT_PROMPTS, self.num_seeds, seed=self.seed, sampler=self.sampler
        )
        self.counter.active = True
        self.curve.append((self.counter.count, result["prominence"]["mean"]))

    def on_train_begin(self, args, state, control, **kwargs):
        self.evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        done = self.counter.count >= self.budget
        if done or self.counter.count >= self.next_eval:
            self.evaluate()
            while self.next_eval <= self.counter.count:
                self.next_eval += self.eval_every
        control.should_training_stop = done
        return control


def config_for(method: Method, seed, output_dir, args):
    shared, dual = main_job_settings(args.main_job_config)
    common = {k: v for k, v in shared.items() if not k.startswith("lora_")}
    common.update(
        output_dir=output_dir,
        max_steps=10_000,  # the forward budget stops training
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=seed,
        use_cpu=True,
        disable_tqdm=True,
        loss_type=method.loss_type,
        sampler=method.sampler,
    )
    if method.dual:
        common.update(reward_weights=dual["reward_weights"], beta=dual["beta"])
    if method.semi_on_policy:
        # each run collects its own buffer (in its output_dir), so the collection is charged to its budget; the
        # reference never moves in this mode: the two-sided clip stops a drifting ratio from blowing up the update
        common.update(training_mode="semi_on_policy", replay_buffer_size=args.buffer_size, delta=args.delta, beta=0.0)
    if method.wide:
        common.update(epsilon=args.wide_epsilon)
    return ARCoPOConfig(**common)


def reward_funcs_for(method: Method, args):
    if not method.dual:
        return [prominence_reward]
    _, dual = main_job_settings(args.main_job_config)
    return [getattr(shapes_rewards, name) for name in dual["reward_funcs"]]


def evaluate(pipeline, seed, args, sampler):
    # fresh seeds: training uses `seed`, the final evaluation 10_000 + seed, the curves 20_000 + seed
    return evaluate_generator(pipeline, HELDOUT_PROMPTS, args.eval_seeds, seed=10_000 + seed, sampler=sampler)


def run_settings(args):
    """The arguments a finished run depends on (a run is reused only when they are unchanged)."""
    keys = (
        "budget",
        "buffer_size",
        "delta",
        "wide_epsilon",
        "eval_every",
        "curve_seeds",
        "eval_seeds",
        "pipeline_path",
    )
    settings = {k: getattr(args, k) for k in keys}
    settings["main_job"] = main_job_settings(args.main_job_config)
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


def train_one(name, seed, args):
    method = METHODS[name]
    output_dir = os.path.join(args.work_dir, f"{name}-seed{seed}")
    done = os.path.join(output_dir, "result.json")
    if os.path.exists(done):  # finished by an earlier invocation with the same work_dir: reuse it
        with open(done) as f:
            run = json.load(f)
        if run.get("settings") != json.loads(json.dumps(run_settings(args))):
            raise ValueError(
                f"{done} was made with other settings ({run.get('settings')}); delete {args.work_dir} or pass another "
                "--work_dir to rerun."
            )
        return run
    pipeline = load_pretrained_pipeline(args.pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    counter = ForwardCounter(pipeline.transformer)
    curve_cb = BudgetAndCurve(
        counter, pipeline, args.budget, args.eval_every, args.curve_seeds, seed=20_000 + seed, sampler=method.sampler
    )
    shared, _ = main_job_settings(args.main_job_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_for(method, seed, output_dir, args)
    trainer = ARCoPOTrainer(
        pipeline=pipeline,
        reward_funcs=reward_funcs_for(method, args),
        args=config,
        train_dataset=make_dataset("train"),
        peft_config=LoraConfig(
            r=shared.get("lora_r", 16),
            lora_alpha=shared.get("lora_alpha", 2 * shared.get("lora_r", 16)),
            target_modules=DEFAULT_LORA_TARGETS,
        ),
        callbacks=[curve_cb],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    counter.active = False
    trainer.save_model(output_dir)
    run = {
        "method": name,
        "seed": seed,
        "forwards": counter.count,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "curve": curve_cb.curve,
        "eval": evaluate(pipeline, seed, args, method.sampler),
        "adapter": output_dir,
        "rollout_counts": dict(trainer.rollout_counts),
        "settings": run_settings(args),
    }
    with open(done + ".tmp", "w") as f:
        json.dump(run, f)
    os.replace(done + ".tmp", done)
    return run


def merged_one(scale, seed, runs, args):
    semi = next(r for r in runs if r["method"] == "semi_dual" and r["seed"] == seed)
    on = next(r for r in runs if r["method"] == "arcopo_dual" and r["seed"] == seed)
    pipeline = load_pretrained_pipeline(args.pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(semi["adapter"], adapter_name="semi")
    pipeline.load_lora_weights(on["adapter"], adapter_name="on_policy")
    combine_adapters(pipeline, "semi", "on_policy", scale=scale)
    start = time.perf_counter()
    result = evaluate(pipeline, seed, args, None)
    return {
        "method": f"merged@{scale}",
        "seed": seed,
        "forwards": semi["forwards"] + on["forwards"],
        "steps": semi["steps"] + on["steps"],
        "seconds": semi["seconds"] + on["seconds"] + time.perf_counter() - start,
        "curve": [],
        "eval": result,
    }


def _cell(values, digits=3, sign=False):
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {statistics.stdev(values):.{digits}f}"


def base_of(method):
    """The untrained row a method is compared with: the base on the sampler the method trained and is evaluated on."""
    return "base_consistency" if method in METHODS and METHODS[method].sampler == "consistency" else "base"


def summarise(runs, methods):
    """Mean ± std over seeds of each column, and of trained − base per seed (the same evaluation noises and sampler)."""
    header = ["method", *[c[0] for c in COLUMNS], "Δ preference", "Δ all-correct", "Δ temporal quality"]
    header += ["forward passes", "wall-clock (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        cells = [_cell([r["eval"][key]["mean"] for r in rows]) for _, key in COLUMNS]
        base = {r["seed"]: r for r in runs if r["method"] == base_of(method)}
        for key in ("prominence", "all_correct", "temporal_quality"):
            diffs = [r["eval"][key]["mean"] - base[r["seed"]]["eval"][key]["mean"] for r in rows if r["seed"] in base]
            cells.append("" if method.startswith("base") or not diffs else _cell(diffs, sign=True))
        forwards = _cell([float(r["forwards"]) for r in rows], 0)
        seconds = _cell([r["seconds"] for r in rows], 0)
        title = TITLES.get(method) or (METHODS[method].title if method in METHODS else method)
        lines.append(f"| `{method}`: {title} | " + " | ".join(cells) + f" | {forwards} | {seconds} |")
    return "\n".join(lines)


def mean_curve(runs, method):
    """The seeds' curves on a common grid (their mean forwards at each point): `(x, mean, std)` or None."""
    rows = [r for r in runs if r["method"] == method and r["curve"]]
    if not rows:
        return None
    length = min(len(r["curve"]) for r in rows)
    x = [statistics.mean(r["curve"][i][0] for r in rows) for i in range(length)]
    ys = [[r["curve"][i][1] for r in rows] for i in range(length)]
    return x, [statistics.mean(v) for v in ys], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]


def forwards_to_reach(curve, target):
    """First forward count at which a mean curve reaches `target` (linear between points), or None if it never does."""
    x, y, _ = curve
    for i, value in enumerate(y):
        if value >= target:
            if i == 0:
                return x[0]
            x0, x1, y0 = x[i - 1], x[i], y[i - 1]
            return x0 + (x1 - x0) * (target - y0) / (value - y0)
    return None


def fig2_summary(runs):
    """How many forward passes AR-CoPO needs to reach SDE-GRPO's final held-out preference (same sampler)."""
    sde, arcopo = mean_curve(runs, "sde_grpo"), mean_curve(runs, "arcopo_consistency")
    if sde is None or arcopo is None:
        return None
    # the question at every point of SDE-GRPO's curve (what a smaller budget would have measured); the last is the answer
    along = []
    for x, y in zip(sde[0][1:], sde[1][1:]):
        at = forwards_to_reach(arcopo, y)
        along.append(
            {"sde_grpo_forwards": x, "sde_grpo": y, "arcopo_forwards": at, "ratio": None if at is None else at / x}
        )
    if not along:
        return None
    final = along[-1]
    return {
        "sde_grpo_final": final["sde_grpo"],
        "sde_grpo_forwards": final["sde_grpo_forwards"],
        "arcopo_forwards": final["arcopo_forwards"],
        "ratio": final["ratio"],
        "along_the_curve": along,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", *METHODS, "merged"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--budget",
        type=int,
        default=33_000,
        help="Transformer chunk-forwards per training run (33,000: the main job's 40 steps, reference passes included).",
    )
    parser.add_argument("--buffer_size", type=int, default=32, help="Semi-on-policy buffer (groups).")
    parser.add_argument("--delta", type=float, default=3.0, help="Two-sided clip of the semi-on-policy runs.")
    parser.add_argument("--wide_epsilon", type=float, default=0.05, help="Ratio clip of `semi_dual_wide`.")
    parser.add_argument("--eval_every", type=int, default=2000, help="Chunk-forwards between points of the curves.")
    parser.add_argument("--curve_seeds", type=int, default=2, help="Curves: videos per held-out prompt.")
    parser.add_argument("--eval_seeds", type=int, default=8, help="Final evaluation: videos per held-out prompt.")
    parser.add_argument("--main_job_config", default=MAIN_JOB_CONFIG, help="The main job's YAML (shared settings).")
    parser.add_argument("--pipeline_path", default=None, help="A pretraining output instead of the shipped model.")
    parser.add_argument("--work_dir", default="outputs/benchmark_moving_shapes")
    parser.add_argument("--output_dir", default="docs/benchmarks/moving_shapes")
    args = parser.parse_args()
    unknown = set(args.methods) - {"base", "merged", *METHODS}
    if unknown:
        parser.error(f"Unknown methods {sorted(unknown)}; use base, merged or {', '.join(METHODS)}.")
    if "merged" in args.methods and not {"semi_dual", "arcopo_dual"} <= set(args.methods):
        parser.error("`merged` needs the `semi_dual` and `arcopo_dual` methods in --methods.")
    os.makedirs(args.work_dir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    total_start = time.perf_counter()

    runs = []
    if "base" in args.methods:
        pipeline = load_pretrained_pipeline(args.pipeline_path)
        pipeline.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        for seed in args.seeds:
            for name, sampler in (("base", None), ("base_consistency", "consistency")):
                result = evaluate(pipeline, seed, args, sampler)
                runs.append(dict(method=name, seed=seed, forwards=0, steps=0, seconds=0.0, curve=[], eval=result))
        print(f"base evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    for name in (m for m in METHODS if m in args.methods):
        for seed in args.seeds:
            run = train_one(name, seed, args)
            runs.append(run)
            print(
                f"{name} seed {seed}: {run['steps']} steps, {run['forwards']} forwards, {run['seconds']:.0f} s, "
                f"held-out preference {run['eval']['prominence']['mean']:.3f}, all-correct "
                f"{run['eval']['all_correct']['mean']:.3f}, temporal quality "
                f"{run['eval']['temporal_quality']['mean']:.3f}",
                flush=True,
            )
    methods = ["base", "base_consistency", *METHODS]
    if "merged" in args.methods:
        for scale in MERGE_SCALES:
            methods.append(f"merged@{scale}")
            for seed in args.seeds:
                runs.append(merged_one(scale, seed, runs, args))

    total = time.perf_counter() - total_start
    fig2 = fig2_summary(runs)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        record = {"args": vars(args), "fig2": fig2, "total_seconds": total}
        record["runs"] = [{k: v for k, v in r.items() if k not in ("adapter", "settings")} for r in runs]
        json.dump(record, f, indent=1)
    lines = [summarise(runs, methods), ""]
    training = sum(r["seconds"] for r in runs if r["method"] in METHODS)
    lines.append(
        f"Held-out prompts (12 × {args.eval_seeds} fresh seeds), each method on the sampler it trained on; mean ± std "
        f"over seeds {args.seeds}; Δ: trained − base per seed (the same noises). Budget {args.budget} chunk-forwards "
        f"per training run. Wall-clock: {training / 60:.1f} min of training runs (reused ones included), "
        f"{total / 60:.1f} min for this invocation."
    )
    if fig2 is not None:
        if fig2["ratio"] is None:
            reach = "AR-CoPO does not reach it within the budget"
        else:
            reach = f"AR-CoPO reaches it after {fig2['arcopo_forwards']:.0f} ({fig2['ratio']:.2f}× SDE-GRPO's)"
        lines.append("")
        lines.append(
            f"Fig. 2 (consistency sampler, preference alone): SDE-GRPO ends at held-out preference "
            f"{fig2['sde_grpo_final']:.3f} after {fig2['sde_grpo_forwards']:.0f} chunk-forwards; {reach}."
        )
        lines += ["", "| SDE-GRPO: chunk-forwards | its held-out preference | AR-CoPO reaches it after | ratio |"]
        lines.append("| --- | --- | --- | --- |")
        for point in fig2["along_the_curve"]:
            at = "never" if point["arcopo_forwards"] is None else f"{point['arcopo_forwards']:.0f}"
            ratio = "" if point["ratio"] is None else f"{point['ratio']:.2f}"
            lines.append(f"| {point['sde_grpo_forwards']:.0f} | {point['sde_grpo']:.3f} | {at} | {ratio} |")
    text = "\n".join(lines)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)

    curves = {METHODS[m].title: c for m in FIG2 if (c := mean_curve(runs, m)) is not None}
    if curves:
        plot_curves(
            os.path.join(args.output_dir, "preference_vs_forwards.png"),
            curves,
            "transformer chunk-forwards",
            "held-out preference (prominence), fresh seeds",
            "Moving Shapes: preference vs compute (mean ± std over seeds)",
        )
    plot_dual_criterion(runs, methods, os.path.join(args.output_dir, "dual_criterion.png"))
    print(f"total {total / 60:.1f} min; results in {args.output_dir}")
    if os.path.isdir(args.work_dir) and os.environ.get("ARCOPO_BENCH_CLEAN"):
        shutil.rmtree(args.work_dir)


def plot_dual_criterion(runs, methods, path):
    """Table 2/3 as a scatter: held-out preference against temporal quality and all-correct, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, (key, label) in zip(axes, (("temporal_quality", "temporal quality"), ("all_correct", "all-correct"))):
        for method in methods:
            rows = [r for r in runs if r["method"] == method]
            if not rows or base_of(method) != "base" or method == "base_consistency":
                continue
            x = [r["eval"]["prominence"]["mean"] for r in rows]
            y = [r["eval"][key]["mean"] for r in rows]
            xe = statistics.stdev(x) if len(x) > 1 else 0.0
            ye = statistics.stdev(y) if len(y) > 1 else 0.0
            ax.errorbar(statistics.mean(x), statistics.mean(y), xerr=xe, yerr=ye, marker="o", capsize=3, label=method)
        ax.set_xlabel("held-out preference (prominence)")
        ax.set_ylabel(f"held-out {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Moving Shapes: the dual criterion (preference up, quality and text alignment kept)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
