"""A group split over 2 CPU processes (gloo) equals the same group in one process."""

import os
import subprocess
import sys

import torch
from helpers import ROOT
from safetensors.torch import load_file


def _run(output_dir, processes: int, split: bool):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "src"))
    script = [os.path.join(ROOT, "tests", "split_groups_run.py"), str(output_dir)] + (["--split"] if split else [])
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29531"]
    result = subprocess.run(launcher + script, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(os.path.join(output_dir, f"rank{r}.safetensors")) for r in range(processes)]


def test_a_group_split_over_two_processes_equals_one_process(tmp_path):
    (single,) = _run(tmp_path / "one", 1, split=False)
    ranks = _run(tmp_path / "two", 2, split=True)
    n, g = single["advantages"].shape  # 2 prompts x 4 candidates
    videos = single["videos"].unflatten(0, (n, g))
    for rank, got in enumerate(ranks):
        # every process built the same prefix and rolled out its half of each group: the same bits
        share = slice(rank * g // 2, (rank + 1) * g // 2)
        assert torch.equal(got["videos"].unflatten(0, (n, g // 2)), videos[:, share])
        # the rewards were gathered: the whole group's advantages, on every process
        assert torch.equal(got["advantages"], single["advantages"]) and torch.equal(got["rewards"], single["rewards"])
    adapters = [{k: v for k, v in r.items() if k.startswith("adapter.")} for r in ranks]
    expected = {k: v for k, v in single.items() if k.startswith("adapter.")}
    assert adapters[0].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(adapters[0][key], adapters[1][key])  # DDP keeps the processes identical
        # each process updated on its half of the anchors; the gradients' mean is the one-process gradient summed in
        # another order, and each process refreshed only its own anchors' stored predictions (a difference at the
        # last bit). Adam moves an element by about lr = 1e-3 a step: equal within 1 % of one step's move (1e-5)
        torch.testing.assert_close(adapters[0][key], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in expected.items() if "lora_B" in k)
