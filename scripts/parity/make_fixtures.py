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
Regenerate the parity fixtures of `tests/test_parity.py` (`tests/fixtures/parity/`) by running the reference
implementations of VideoAlign (KwaiVGI/VideoAlign's source) and HPSv3 (the `hpsv3` wheel) on tiny random models.

    python scripts/parity/make_fixtures.py                      # builds /tmp/parity-venv, clones VideoAlign
    python scripts/parity/make_fixtures.py --videoalign-src ~/VideoAlign --skip-install

The references need transformers 4.45 (trl_arcopo needs 5), so they run in a side virtual environment, built here
with `python -m venv` and pip from the package registry: torch/torchvision (the PyPI builds: torchvision's compiled
ops need the torch it was built against), transformers 4.45.2 and what the two references import, and `hpsv3`
without its dependencies (it declares training-only ones, deepspeed among them, which inference does not import).
VideoAlign is not a package: its `*.py` files at `VIDEOALIGN_COMMIT` are taken from a clone (or `--videoalign-src`, a
checkout or a bare git directory). `reference_driver.py` then builds the models, runs the references on CPU (a few
seconds) and writes the fixtures: tokenizer and config files, the weights as bfloat16 safetensors (no pickle), and
`reference.json` (the references' outputs, hashes of their inputs and resized frames, package versions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
VIDEOALIGN_REPO = "https://github.com/KwaiVGI/VideoAlign"
VIDEOALIGN_COMMIT = "219ab9db64c045e5181a2202d11f686439351292"
TORCH = ["torch==2.13.0", "torchvision==0.28.0"]
# transformers 4.45.2 is what both references pin; the rest is what their inference imports, at versions that work
# with it (VideoAlign's environment.yaml pins torch 2.3.1 and peft 0.10: torch is ours here, so that the resize
# kernels are the same code on both sides)
REFERENCE_PACKAGES = [
    "transformers==4.45.2",
    "tokenizers==0.20.0",
    "accelerate==0.34.0",
    "peft==0.13.2",
    "trl==0.11.4",
    "numpy==1.26.4",
    "pillow==10.4.0",
    "safetensors==0.4.5",
    "datasets==3.0.1",
    "pyarrow==17.0.0",
    "pandas==3.0.6",
    "matplotlib==3.11.2",
    "tensorboard==2.21.0",
    "fire==0.7.1",
    "omegaconf==2.4.0",
    "pyyaml==6.0.4",
    "requests==2.34.2",
    "rich==15.0.0",
]
HPSV3 = "hpsv3==1.0.0"


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)  # noqa: T201
    subprocess.run(command, check=True, **kwargs)


def build_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # --isolated: ignore local pip settings (a find-links folder of CPU-only torch wheels, constraints), so that torch
    # and torchvision are the matching PyPI builds; the certificate setting is kept
    cert = ["--cert", os.environ["PIP_CERT"]] if os.environ.get("PIP_CERT") else []
    run([str(python), "-m", "pip", "--isolated", "install", "--quiet", *cert, *TORCH])
    run([*pip, *REFERENCE_PACKAGES])
    run([*pip, "--no-deps", HPSV3])
    return python


def videoalign_source(given: Path | None, work: Path) -> Path:
    """VideoAlign's `*.py` files at `VIDEOALIGN_COMMIT`, in `work / "VideoAlign"`."""
    target = work / "VideoAlign"
    target.mkdir(parents=True)
    if given is None:
        clone = work / "VideoAlign.git"
        run(["git", "clone", "--quiet", "--bare", VIDEOALIGN_REPO, str(clone)])
        given = clone
    git_dir = given if (given / "HEAD").is_file() and (given / "objects").is_dir() else given / ".git"
    if git_dir.is_dir():
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", VIDEOALIGN_COMMIT, "--", "*.py"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    else:  # a plain copy of the sources: used as it is
        for file in given.glob("*.py"):
            shutil.copy(file, target / file.name)
    if not (target / "inference.py").is_file():
        raise FileNotFoundError(f"{given} holds no VideoAlign `inference.py` at commit {VIDEOALIGN_COMMIT}.")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/parity-venv"))
    parser.add_argument("--skip-install", action="store_true", help="use --venv as it is")
    parser.add_argument("--videoalign-src", type=Path, help="a VideoAlign checkout or bare git dir (default: clone)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    args = parser.parse_args()
    python = args.venv / "bin" / "python" if args.skip_install else build_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="parity-") as scratch:
        work = Path(scratch)
        source = videoalign_source(args.videoalign_src, work)
        run([str(python), str(Path(__file__).with_name("reference_driver.py")), "--videoalign-src", str(source),
             "--videoalign-commit", VIDEOALIGN_COMMIT, "--out", str(args.out), "--work", str(work / "run")])  # fmt: skip
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"Wrote {args.out} ({size / 1e3:.0f} kB). Check it: python -m pytest tests/test_parity.py -q")  # noqa: T201


if __name__ == "__main__":
    main()
