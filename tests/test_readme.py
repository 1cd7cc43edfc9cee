"""Every command of README.md runs as written: its bash and python blocks, in order, on a tiny model.

The blocks run one after the other (later ones use what earlier ones wrote) in a scratch folder
that stands in for the repository root. What the test changes, and nothing else:

* ``MODEL_NAME`` (SmolLM2-135M-Instruct) becomes a tiny random Llama with SmolLM2's tokenizer
  (tests/train_support.py), in every block and in the scratch copy of examples/, so a command
  takes seconds instead of minutes;
* the scratch folder holds a copy of examples/ (without generated data), a link to benchmarks/,
  and a link ``.venv`` to the environment running the tests, so ``.venv/bin/...`` works as written;
* the environment adds HF_HUB_OFFLINE=1 (no network here) to the test harness's own
  (OMP_WAIT_POLICY=PASSIVE, QK_CPU_DTYPE=fp32);
* ``chat`` reads `CHAT_INPUT` from stdin.

`SKIPPED` lists the blocks not run and why; `HELP_ONLY` those run with ``--help`` appended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from train_support import tiny_model_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_NAME = "smollm2-135m-instruct"
CHAT_INPUT = "Hello\n/reset\nHi again\n/exit\n"
BLOCK_TIMEOUT_S = 300

SKIPPED = {
    r"^scripts/bootstrap\.sh && ": "set-up command: bootstrap, then the 10-minute demo or the whole test suite "
    "(CI runs both through .ci/run; tests/test_train_demo.py runs the demo on a tiny model)",
    r"download\.pytorch\.org": "installs a CUDA build of torch into .venv: needs a GPU machine and a network",
    r"benchmarks\.gpu_check --all": "needs a CUDA GPU (tests/test_gpu_check.py runs its CPU smoke mode)",
    r"--nproc-per-node 4": "written for 4 GPUs; the same launch on the CPU (2 ranks over gloo) is the next block",
    r"--nnodes 2": "needs two machines",
}
HELP_ONLY = {
    r"benchmarks\.suite --suite": "the suite takes about 10 minutes; --help checks the module and its --suite choices",
}


@dataclass
class Block:
    """One fenced code block of the README."""

    language: str  # "bash" | "python"
    line: int  # 1-based line of the opening fence
    text: str

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0]
        return f"L{self.line}-{self.language}: {first[:60]}"

    def rule(self, rules: dict[str, str]) -> str | None:
        return next((why for pattern, why in rules.items() if re.search(pattern, self.text, re.M)), None)


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    fence = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)
    return [Block(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in fence.finditer(text)]


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float


def _scratch_root(folder: Path, model: Path) -> None:
    """A stand-in for a fresh clone after bootstrap: examples/ (model replaced), benchmarks/, .venv."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "qlora-kernels").exists():
        pytest.skip(f"the README calls .venv/bin/ programs: run the tests with the venv bootstrap makes, not {venv}")
    shutil.copytree(ROOT / "examples", folder / "examples", ignore=shutil.ignore_patterns("data", "__pycache__"))
    config = folder / "examples" / "expenses" / "config.yaml"
    text = config.read_text(encoding="utf-8").replace(MODEL_NAME, str(model))
    text = text.replace("\nr: 32\n", "\nr: 8\n")  # the tiny stand-in's narrowest layer is 16 wide
    config.write_text(text, encoding="utf-8")
    (folder / "benchmarks").symlink_to(ROOT / "benchmarks")
    (folder / ".venv").symlink_to(venv)


def _run(block: Block, folder: Path, model: Path, help_only: bool) -> Outcome:
    text = block.text.replace(MODEL_NAME, str(model))
    if help_only:
        text = "\n".join(f"{line} --help" if line.strip() else line for line in text.splitlines())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if block.language == "python":
        script = folder / f"readme_block_{block.line}.py"
        script.write_text(text, encoding="utf-8")
        command = [str(folder / ".venv" / "bin" / "python"), script.name]
    else:
        command = ["bash", "-euo", "pipefail", "-c", text]
    start = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=folder,
        env=env,
        input=CHAT_INPUT,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    return Outcome(done.returncode, done.stdout + done.stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, dict[int, Outcome]]:
    """(scratch folder, outcome by the block's line): every block not skipped, in README order."""
    folder = tmp_path_factory.mktemp("readme")
    model = tiny_model_dir()
    _scratch_root(folder, model)
    outcomes = {}
    for block in readme_blocks():
        if block.rule(SKIPPED):
            continue
        outcomes[block.line] = _run(block, folder, model, help_only=block.rule(HELP_ONLY) is not None)
        print(f"{block.id}: exit {outcomes[block.line].returncode} in {outcomes[block.line].seconds:.1f}s")
    return folder, outcomes


def _last_json(output: str) -> dict:
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def _files(folder: Path, *paths: str) -> None:
    missing = [p for p in paths if not (folder / p).is_file()]
    assert not missing, f"not written: {missing}"


def _scores(output: str, n: int) -> None:
    scores = _last_json(output)
    assert scores["n_eval"] == n and 0 <= scores["exact"] <= scores["format"] <= 1, scores


def _check_data(folder: Path, output: str) -> None:
    _files(folder, "examples/expenses/data/train.jsonl", "examples/expenses/data/eval.jsonl")


def _check_train(folder: Path, output: str) -> None:
    assert "done: 10 steps" in output
    _files(folder, "out/expenses/adapter/adapter_model.safetensors", "out/expenses/metrics.jsonl")


def _check_eval(folder: Path, output: str) -> None:
    _scores(output, 10)
    assert output.count("--- sample ") == 3


def _check_resume(folder: Path, output: str) -> None:
    for expected in ("nothing to train", "resumed from", "done: 15 steps", "done: 10 steps"):
        assert expected in output


def _check_chat(folder: Path, output: str) -> None:
    assert output.count("model> ") == 2 and "(conversation cleared)" in output


def _check_own_data(folder: Path, output: str) -> None:
    _files(folder, "out/my_task/adapter/adapter_config.json")
    _scores(output, 3)


def _check_help_config(folder: Path, output: str) -> None:
    assert output == (ROOT / "docs" / "config.md").read_text(encoding="utf-8")


def _check_info(folder: Path, output: str) -> None:
    assert "CPU compute dtype: fp32 (env: QK_CPU_DTYPE=fp32)" in output


def _check_suite_help(folder: Path, output: str) -> None:
    assert "--suite" in output and "methods" in output


#: What a block must print or leave behind beyond exit code 0, keyed by a pattern of its text.
CHECKS: dict[str, Callable[[Path, str], None]] = {
    r"examples/expenses/generate\.py": _check_data,
    r"--set max_steps=10$": _check_train,
    r"eval --adapter out/expenses/adapter": _check_eval,
    r"--resume --change-schedule": _check_resume,
    r"qlora-kernels merge": lambda folder, output: _files(folder, "out/merged/config.json"),
    r"qlora-kernels chat": _check_chat,
    r"cat > my_task/config\.yaml": _check_own_data,
    r"--help-config": _check_help_config,
    r"QK_CPU_DTYPE=fp32 \.venv/bin/qlora-kernels info": _check_info,
    r"--nproc-per-node 2": lambda folder, output: _files(folder, "out/ddp-cpu/adapter/adapter_config.json"),
    r"qk\.save_adapter": lambda folder, output: _files(
        folder, "out/api-adapter/adapter_config.json", "out/w.safetensors"
    ),
    r"SFTTrainer": lambda folder, output: _files(folder, "out/trl/adapter/adapter_config.json"),
    r"benchmarks\.suite --suite": _check_suite_help,
}


def test_the_set_up_commands_are_the_ones_ci_runs():
    """The README's two commands, word for word: the main job, and the test run .ci/run makes."""
    blocks = [b.text.strip() for b in readme_blocks()]
    assert blocks[:2] == [
        "scripts/bootstrap.sh && .venv/bin/qlora-kernels demo --out out/demo",
        "scripts/bootstrap.sh && .venv/bin/python -m pytest -q",
    ]
    assert blocks[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_the_readme_has_the_blocks_this_test_expects():
    """Every skip and check rule still matches a block, so an edited README cannot silently drop a command."""
    blocks = readme_blocks()
    for rules in (SKIPPED, HELP_ONLY, CHECKS):
        for pattern in rules:
            assert any(re.search(pattern, b.text, re.M) for b in blocks), f"no README block matches {pattern!r}"
    assert all(b.text.strip() for b in blocks)


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: b.id)
def test_readme_block_runs(block: Block, readme_run):
    reason = block.rule(SKIPPED)
    if reason:
        pytest.skip(reason)
    folder, outcomes = readme_run
    outcome = outcomes[block.line]
    assert outcome.returncode == 0, f"README line {block.line} exited {outcome.returncode}:\n{outcome.output[-3000:]}"
    for pattern, check in CHECKS.items():
        if re.search(pattern, block.text, re.M):
            try:
                check(folder, outcome.output)
            except AssertionError as e:
                raise AssertionError(f"README line {block.line}, {pattern!r}: {e}\n{outcome.output[-3000:]}") from None
