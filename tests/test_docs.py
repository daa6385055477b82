"""
The documentation runs: the site builds with `mkdocs build --strict`, and every fenced code block of `docs/` either
runs here on tiny components or says what it needs.

    python -m pytest tests/test_docs.py                          # every page
    python -m pytest tests/test_docs.py -k arcopo_trainer.md     # one page; `-k "planning.md:15"` one block

One test per block, named `page:line` (the line of its opening fence).

- **Marked blocks** start with a comment `# Needs: <what>` (a GPU, weights, network access, a server, minutes of
  CPU): they are reported as skipped with that reason. The marker is part of the page, so readers see it too.
- **Python blocks** (`py`, `python`) run in this process (torch on one thread), page by page in one namespace per
  page, in order, so a block may use the names of the blocks above it (a block run alone first runs the unmarked
  blocks above it).
- **Shell blocks** (`bash`, `sh`, `shell`; `console` lines that start with `$ `) run with `bash -euo pipefail`, in the
  background from the first block test on (so they use the second core; they must not need the files of the page's
  Python blocks), each in its own process group, which is ended after `BASH_TIMEOUT` seconds. Their tests come last.
  Only cheap commands (a few seconds, such as `trl-arcopo plan ...`) are left unmarked.
- A block in another language, or none, is not run; if it looks like code, the test fails and asks for a language.

Every block runs in a fresh working directory per page (its files stay until the test session ends), offline
(`HF_HUB_OFFLINE=1`, `WANDB_MODE=offline`), which holds the stand-ins at the paths the docs use:

| path | stand-in |
| --- | --- |
| `path/to/self-forcing-diffusers` | `trl_arcopo.testing_utils.tiny_pipeline()` saved with `save_pretrained`: pixel space, 3 chunks of 3 frames of 8x8 pixels by default, and a RoPE table of 128 frames so that the docs' 81-frame videos fit |
| `checkpoints/self_forcing_dmd.pt`, `Wan2.1-T2V-1.3B-Diffusers` | a tiny Self-Forcing checkpoint and Wan folder, as `tests/test_convert.py` builds them |
| `examples`, `benchmarks` | links to the repository's folders |

and Python blocks start with these names defined (a block that defines one replaces it):

| name | value |
| --- | --- |
| `pipe` | `SelfForcingPipeline.from_pretrained("path/to/self-forcing-diffusers")` |
| `prompts` | two prompts |
| `dataset`, `ds` | `datasets.Dataset.from_dict({"prompt": prompts})` |
| `my_reward` | a toy reward, `trl_arcopo.rewards.redness` |
| `rewards` | `[my_reward]` |
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BASH_TIMEOUT = 60  # seconds per shell block
MARKER = re.compile(r"^#\s*Needs:\s*(?P<reason>.+?)\s*$")
PYTHON = {"py", "python", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
# a block without a runnable language that has one of these lines is code and must say its language
CODE_LINE = re.compile(
    r"^\s*(\$ |import \w|from [\w.]+ import |def \w+\(|class \w+[(:]|python3? |pip |trl-arcopo|accelerate |torchrun |"
    r"pytest |hf |[\w.]+ = [\w.]+\()"
)
PROMPTS = ["a red fox jumps over the car", "a blue car in the city at night"]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
    "TQDM_DISABLE": "1",
    "NO_MKDOCS_2_WARNING": "1",
}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
# a line that `pymdownx.snippets` replaces by a file, or by the lines between `--8<-- [start:NAME]` and `[end:NAME]`
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')


@dataclass
class Block:
    page: str  # relative to docs/
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        if self.language in PYTHON:
            return "python"
        if self.language in SHELL:
            return "shell"
        return "other"

    @property
    def needs(self) -> str | None:
        """The reason of the block's `# Needs:` marker (its first line), or None."""
        first = self.code.lstrip("\n").split("\n", 1)[0]
        match = MARKER.match(first.strip())
        return match["reason"] if match else None

    @property
    def looks_like_code(self) -> bool:
        return any(CODE_LINE.match(line) for line in self.code.splitlines())


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, indented ones (in lists) included, with their indentation removed."""
    lines = path.read_text(encoding="utf-8").split("\n")
    page = path.relative_to(DOCS).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = (match["info"].split() or [""])[0].strip("{}.").lower()
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
        blocks.append(Block(page, i + 1, language, "\n".join(expand_snippets(line) for line in body) + "\n"))
        i = end + 1
    return blocks


def expand_snippets(line: str) -> str:
    """A block's line as the site shows it: a `--8<-- "path:section"` line becomes that part of the file, dedented."""
    match = _SNIPPET.match(line)
    if not match:
        return line
    text = (ROOT / match["path"]).read_text(encoding="utf-8").split("\n")
    if match["section"]:
        marks = [i for i, row in enumerate(text) if f"--8<-- [start:{match['section']}]" in row]
        marks += [i for i, row in enumerate(text) if f"--8<-- [end:{match['section']}]" in row]
        if len(marks) != 2:
            raise ValueError(
                f"{match['path']} has no section {match['section']!r} (`--8<-- [start:...]`/`[end:...]`)."
            )
        text = text[marks[0] + 1 : marks[1]]
    return textwrap.dedent("\n".join(text)).rstrip("\n")


def collect_blocks() -> list[Block]:
    """Every block of `docs/**/*.md` (pages in folders count only if they have blocks)."""
    return [block for path in sorted(DOCS.rglob("*.md")) for block in extract_blocks(path)]


# the shell blocks last: they run in the background from the first block on, and their tests wait for them
BLOCKS = sorted(
    (block for block in collect_blocks() if block.kind != "other" or block.looks_like_code),
    key=lambda block: block.kind == "shell",
)


# ------------------------------------------------------------------------------------------------------ stand-ins
def _self_forcing_folder(folder: Path) -> None:
    from trl_arcopo.testing_utils import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.register_to_config(default_height=8, default_width=8)  # 16 tokens per frame: half the time of 16x16
    # a RoPE table of 128 frames, for the docs' 81-frame videos (its tables are buffers, not weights)
    pipe.transformer.register_to_config(rope_max_seq_len=128)
    pipe.save_pretrained(folder)


def _wan_folder(folder: Path) -> None:
    from trl_arcopo.testing_utils import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae

    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_transformer(causal=False, seed=2).save_pretrained(folder / "transformer")


def _self_forcing_checkpoint(folder: Path) -> None:
    import torch
    from test_convert import to_self_forcing

    from trl_arcopo.testing_utils import tiny_transformer

    generator = to_self_forcing(tiny_transformer(causal=False, seed=1).state_dict())
    folder.mkdir(parents=True)
    torch.save({"generator": generator, "generator_ema": generator}, folder / "self_forcing_dmd.pt")


# path in the docs -> (what to create under the working directory, how)
STAND_INS = {
    "path/to/self-forcing-diffusers": ("path/to/self-forcing-diffusers", _self_forcing_folder),
    "checkpoints/self_forcing_dmd.pt": ("checkpoints", _self_forcing_checkpoint),
    "Wan2.1-T2V-1.3B-Diffusers": ("Wan2.1-T2V-1.3B-Diffusers", _wan_folder),
}
LINKED = ("examples", "benchmarks")


@dataclass
class Page:
    """A page's working directory and namespace, shared by its blocks."""

    cwd: Path
    namespace: dict = field(default_factory=dict)
    done: set[int] = field(default_factory=set)  # lines of the Python blocks that ran
    failed: list[str] = field(default_factory=list)


_PAGES: dict[str, Page] = {}


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> Path:
    """The stand-ins, built once per session (each lazily, on first use)."""
    return tmp_path_factory.mktemp("docs-stand-ins")


def _page(block: Block, stand_ins: Path, tmp_path_factory) -> Page:
    if block.page in _PAGES:
        return _PAGES[block.page]
    cwd = tmp_path_factory.mktemp(re.sub(r"\W", "_", block.page))
    text = "\n".join(b.code for b in BLOCKS if b.page == block.page)
    for name in LINKED:
        (cwd / name).symlink_to(ROOT / name, target_is_directory=True)
    needed = {target for key, (target, _) in STAND_INS.items() if key in text} | {"path/to/self-forcing-diffusers"}
    for target, build in STAND_INS.values():
        if target in needed:
            built = stand_ins / target
            if not built.exists():
                build(built)
            (cwd / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(built, cwd / target)
    _PAGES[block.page] = page = Page(cwd)
    return page


def _predefined(cwd: Path) -> dict:
    from datasets import Dataset

    from trl_arcopo import SelfForcingPipeline
    from trl_arcopo.rewards import redness

    pipe = SelfForcingPipeline.from_pretrained(cwd / "path/to/self-forcing-diffusers")
    pipe.set_progress_bar_config(disable=True)
    dataset = Dataset.from_dict({"prompt": list(PROMPTS)})
    return {
        "__name__": "__main__",
        "pipe": pipe,
        "prompts": list(PROMPTS),
        "dataset": dataset,
        "ds": dataset,
        "my_reward": redness,
        "rewards": [redness],
    }


@pytest.fixture
def docs_env(monkeypatch):
    import torch

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast as 2 on the tiny models, and leaves a core to the shell blocks
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ the tests
def test_docs_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        check=False,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"


def test_blocks_are_found():
    """The parser finds the blocks (a broken one would leave nothing to run)."""
    pages = {block.page for block in BLOCKS}
    assert {"arcopo_trainer.md", "streaming_generation.md", "planning.md", "moving_shapes.md"} <= pages
    assert sum(block.kind == "python" for block in BLOCKS) > 20


def _run_python(block: Block, page: Page) -> None:
    # padded so that tracebacks give the page's own line numbers, and show its lines
    code = compile("\n" * block.line + block.code, str(DOCS / block.page), "exec")
    exec(code, page.namespace)  # noqa: S102 (the documentation's own code)


@dataclass
class ShellJob:
    block: Block
    process: subprocess.Popen
    started: float

    def result(self) -> tuple[int | None, str]:
        """`(exit status, output)`, the status None if the block ran past `BASH_TIMEOUT`; its process group is ended."""
        try:
            output, _ = self.process.communicate(timeout=max(0.0, self.started + BASH_TIMEOUT - time.monotonic()))
            status = self.process.returncode
        except subprocess.TimeoutExpired:
            self.kill()
            output, _ = self.process.communicate()
            status = None
        self.kill()  # background jobs it left
        return status, output

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_shell(block: Block, cwd: Path, env: dict) -> ShellJob:
    code = block.code
    if block.language == "console":
        code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ "))
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: background jobs and servers are ended with it
    )
    return ShellJob(block, process, time.monotonic())


@pytest.fixture(scope="session")
def shell_jobs(request, stand_ins, tmp_path_factory):
    """
    The selected unmarked shell blocks, started together in the background when the first block test runs (each in
    its page's directory; they do not wait for the page's Python blocks), so that they use the core the in-process
    Python blocks leave free. Their tests wait for them.
    """
    env = {
        **os.environ,
        **ENV,
        "HF_HOME": str(tmp_path_factory.getbasetemp() / "hf_home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    jobs = {}
    for item in request.session.items:
        block = getattr(item, "callspec", None) and item.callspec.params.get("block")
        if isinstance(block, Block) and block.kind == "shell" and block.needs is None:
            jobs[block.id] = _start_shell(block, _page(block, stand_ins, tmp_path_factory).cwd, env)
    yield jobs
    for job in jobs.values():
        job.kill()


def _check_shell(job: ShellJob) -> None:
    status, output = job.result()
    tail = "\n".join(output.splitlines()[-40:])
    if status is None:
        pytest.fail(
            f"docs/{job.block.id}: still running after {BASH_TIMEOUT} s (a server, or a long run): mark it "
            f"`# Needs: ...`.\n{tail}",
            pytrace=False,
        )
    if status:
        pytest.fail(f"docs/{job.block.id}: exit status {status}\n{tail}", pytrace=False)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_doc_block(block: Block, shell_jobs, stand_ins, tmp_path_factory, docs_env, monkeypatch):
    if block.kind == "other":
        pytest.fail(
            f"docs/{block.id} looks like code: give its fence a language (```py or ```bash) so that it is run, "
            "or mark it `# Needs: ...`",
            pytrace=False,
        )
    if block.needs is not None:
        pytest.skip(f"Needs: {block.needs}")
    page = _page(block, stand_ins, tmp_path_factory)
    monkeypatch.chdir(page.cwd)
    if block.kind == "shell":
        _check_shell(shell_jobs[block.id])
        return
    if not page.namespace:
        page.namespace.update(_predefined(page.cwd))
    # a block run alone (`-k`) first runs the unmarked Python blocks above it
    earlier = [b for b in BLOCKS if b.page == block.page and b.line < block.line and b.kind == "python"]
    for above in earlier:
        if above.needs is None and above.line not in page.done:
            page.done.add(above.line)
            try:
                _run_python(above, page)
            except Exception:  # noqa: BLE001 (its own test reports it)
                page.failed.append(above.id)
    page.done.add(block.line)
    try:
        _run_python(block, page)
    except Exception:  # noqa: BLE001 (reported with the page's line numbers)
        above = f" (blocks above it failed: {', '.join(page.failed)})" if page.failed else ""
        page.failed.append(block.id)
        pytest.fail(f"docs/{block.id} failed{above}:\n{traceback.format_exc(limit=-3)}", pytrace=False)
