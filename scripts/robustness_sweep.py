"""Bad and edge inputs against the CLI and the Python API: how many are handled well.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/robustness_sweep.py [-k SUBSTRING] [-v]

Runs every case of issue 18's sweep (and those of issue 17 about eval and resume) on a tiny
random Llama, mostly in-process, the signal cases in child processes. A case is handled well when:

- CLI: the exit code is the expected one; an error is one line on stderr starting with "error:"
  and naming what it must name (the file, the key, the tensor); no traceback; and an error
  found before the model loads (exit 2) really comes before any model load;
- API: the expected exception type with a message naming what it must name, or the expected result.

Prints one line per case, then "handled well: N/M". Exit status 0 when N >= --target (135).
A few minutes on 2 cores.
"""

# ruff: noqa: E501  (the case tables keep one case per line)
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-Llama helpers of the test suite
sys.path.insert(0, str(ROOT))  # benchmarks/ (a folder of the checkout, not an installed package)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

import qlora_kernels as qk  # noqa: E402
import qlora_kernels.models as models_module  # noqa: E402
from qlora_kernels.cli import main as cli_main  # noqa: E402

TARGET = 135


# ---------------------------------------------------------------------------- running
@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    loads: int
    escaped: str = ""  # a traceback that escaped main()


@dataclass
class Result:
    ok: bool
    detail: str = ""


@dataclass
class Case:
    name: str
    run: Callable[[], Result]
    area: str = "app"  # "lib": the library layer (formats, nn, prepare_model)


@dataclass
class Env:
    """Files shared by the cases: a tiny model, data, a trained run with its adapter."""

    root: Path
    model: Path = Path()
    train_file: Path = Path()
    eval_file: Path = Path()
    run_dir: Path = Path()
    adapter: Path = Path()
    base: dict[str, Any] = field(default_factory=dict)
    counter: int = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.root / f"{self.counter:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def config(self, folder: Path, **overrides: Any) -> Path:
        data = {**self.base, "output_dir": str(folder / "run"), **overrides}
        path = folder / "c.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path


def run_cli(argv: list[str], patches: list[tuple[Any, str, Any]] | None = None) -> Outcome:
    """main(argv) in this process, stdout/stderr captured, model loads counted."""
    loads = {"n": 0}
    real = models_module.load_model

    def counting(*a: Any, **kw: Any) -> Any:
        loads["n"] += 1
        return real(*a, **kw)

    out, err = io.StringIO(), io.StringIO()
    saved = [(qk, "load_model", qk.load_model), (models_module, "load_model", real)]
    saved += [(obj, name, getattr(obj, name)) for obj, name, _ in patches or []]
    qk.load_model = models_module.load_model = counting
    for obj, name, value in patches or []:
        setattr(obj, name, value)
    code, escaped = None, ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:
                escaped = traceback.format_exc()
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return Outcome(code, out.getvalue(), err.getvalue(), loads["n"], escaped)


def judge(o: Outcome, code: int, names: tuple[str, ...] = (), before_load: bool | None = None) -> Result:
    """The CLI rules of the module docstring."""
    if o.escaped:
        return Result(False, "traceback escaped: " + o.escaped.strip().splitlines()[-1])
    if "Traceback (most recent call last)" in o.err:
        return Result(False, "traceback printed")
    if o.code != code:
        last = (o.err.strip().splitlines() or [""])[-1]
        return Result(False, f"exit {o.code}, expected {code}: {last[:200]}")
    if code in (1, 2, 3):
        errors = [line for line in o.err.splitlines() if "error:" in line]
        if len(errors) != 1:
            return Result(False, f"{len(errors)} error lines")
        missing = [n for n in names if n.lower() not in errors[0].lower()]
        if missing:
            return Result(False, f"message lacks {missing}: {errors[0][:200]}")
    before = code == 2 if before_load is None else before_load
    if before and o.loads:
        return Result(False, "the model loaded before the error")
    return Result(True, (o.err.strip().splitlines() or [""])[-1][:160])


def cli_case(argv: Callable[[], list[str]], code: int, names: tuple[str, ...] = (), **kw: Any) -> Callable[[], Result]:
    return lambda: judge(run_cli(argv()), code, names, **kw)


def raises(fn: Callable[[], Any], exc: type | tuple[type, ...], names: tuple[str, ...] = ()) -> Result:
    try:
        fn()
    except exc as e:
        message = str(e)
        missing = [n for n in names if n.lower() not in message.lower()]
        if missing:
            return Result(False, f"{type(e).__name__} lacks {missing}: {message[:200]}")
        return Result(True, f"{type(e).__name__}: {message[:140]}")
    except Exception as e:
        return Result(False, f"{type(e).__name__} instead of {exc}: {str(e)[:200]}")
    return Result(False, "no error")


def check(condition: bool, detail: str) -> Result:
    return Result(bool(condition), detail)


# ------------------------------------------------------------------------------ setup
def make_env(root: Path) -> Env:
    from train_support import tiny_model_dir, write_expense_data

    env = Env(root)
    env.model = root / "tiny"
    shutil.copytree(tiny_model_dir(), env.model)
    env.train_file, env.eval_file = write_expense_data(root / "data", n_train=16, n_eval=4)
    env.base = {
        "model": str(env.model),
        "method": "lora",
        "r": 4,
        "alpha": 8.0,
        "train_file": str(env.train_file),
        "eval_file": str(env.eval_file),
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "save_every": 2,
        "progress": False,
        "max_length": 256,
    }
    folder = env.fresh("trained")
    o = run_cli(["train", "--config", str(env.config(folder))])
    if o.code != 0:
        raise RuntimeError(f"the reference run failed: {o.err}{o.escaped}")
    env.run_dir, env.adapter = folder / "run", folder / "run" / "adapter"
    return env


def copy_adapter(env: Env, name: str) -> Path:
    folder = env.fresh(name)
    shutil.copytree(env.adapter, folder / "adapter")
    shutil.copy(env.run_dir / "train_config.json", folder / "train_config.json")
    return folder / "adapter"


def poison_adapter(path: Path) -> str:
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    return key


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def trained_copy(env: Env, name: str, **overrides: Any) -> tuple[Path, Path]:
    """A copy of the reference run (checkpoints 2 and 4) with its config file."""
    folder = env.fresh(name)
    shutil.copytree(env.run_dir, folder / "run")
    return folder, env.config(folder, **overrides)


# ----------------------------------------------------------------------------- cases
def config_cases(env: Env) -> list[Case]:
    """A bad value for every key that has a range, each refused before the model loads (exit 2)."""
    bad_values = [
        ("max_steps=0", "max_steps"),
        ("batch_size=0", "batch_size"),
        ("grad_accum=0", "grad_accum"),
        ("lr=0", "lr"),
        ("lr=-1", "lr"),
        ("lr=.nan", "lr"),
        ("lr=fast", "lr"),
        ("min_lr_ratio=2", "min_lr_ratio"),
        ("warmup_steps=-1", "warmup_steps"),
        ("log_every=0", "log_every"),
        ("eval_every=-1", "eval_every"),
        ("eval_batches=0", "eval_batches"),
        ("dropout=1.5", "dropout"),
        ("dropout=-0.1", "dropout"),
        ("r=0", "r"),
        ("r=100000", "'r'"),
        ("r=true", "r"),
        ("alpha=0", "alpha"),
        ("alpha=.nan", "alpha"),
        ("alpha=thirty", "alpha"),
        ("target_modules=[nonexistent]", "nonexistent"),
        ("target_modules=[]", "target_modules"),
        ("target_modules=[embed_tokens]", "embed_tokens"),
        ("betas=[0.9, 2.0]", "betas"),
        ("betas=[0.9]", "betas"),
        ("betas=[a, b]", "betas"),
        ("weight_decay=-1", "weight_decay"),
        ("dtype=fp16", "fp16"),
        ("dtype=fp64", "dtype"),
        ("model_dtype=int8", "model_dtype"),
        ("method=magic", "method"),
        ("quant=fp3", "quant"),
        ("method=qlora", "quant"),  # with quant=none below
        ("threads=-1", "threads"),
        ("max_length=1", "max_length"),
        ("grad_clip=-1", "grad_clip"),
        ("time_budget_s=-5", "time_budget_s"),
        ("keep_checkpoints=0", "keep_checkpoints"),
        ("lr_decay=0", "lr_decay"),
        ("policy=bad", "policy"),
        ("k=100", "'k'"),  # with method=partial below
        ("bottleneck=0", "bottleneck"),
        ("num_virtual_tokens=0", "num_virtual_tokens"),
        ("seed=-1", "seed"),
        ("save_every=-1", "save_every"),
        ("train_file=''", "train_file"),
        ("output_dir=''", "output_dir"),
        ("model=''", "model"),
        ("eval_file=''", "eval_file"),  # with eval_every=2
        ("lerning_rate=1", "lerning_rate"),
        ("lr", "key=value"),
    ]
    extra = {"method=qlora": ["--set", "quant=none"], "k=100": ["--set", "method=partial"]}
    extra["eval_file=''"] = ["--set", "eval_every=2"]
    cases = []
    for item, name in bad_values:

        def argv(item: str = item) -> list[str]:
            folder = env.fresh("config")
            return ["train", "--config", str(env.config(folder)), "--set", item, *extra.get(item, [])]

        cases.append(Case(f"train --set {item}", cli_case(argv, 2, (name,))))
    return cases


def file_cases(env: Env) -> list[Case]:
    def config_file(name: str, content: bytes) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            path = env.fresh("cfgfile") / name
            path.write_bytes(content)
            return ["train", "--config", str(path)]

        return argv

    def data_file(key: str, make: Callable[[Path], Path]) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            folder = env.fresh("data")
            return ["train", "--config", str(env.config(folder, **{key: str(make(folder))}))]

        return argv

    def write(name: str, content: bytes) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            (folder / name).write_bytes(content)
            return folder / name

        return make

    def model_path(make: Callable[[Path], Path]) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            folder = env.fresh("model")
            return ["train", "--config", str(env.config(folder, model=str(make(folder))))]

        return argv

    def directory(folder: Path) -> Path:
        (folder / "d").mkdir()
        return folder / "d"

    def no_config_json(folder: Path) -> Path:
        (folder / "m").mkdir()
        (folder / "m" / "weights.bin").write_bytes(b"x")
        return folder / "m"

    def output_dir_is_file() -> list[str]:
        folder = env.fresh("outfile")
        (folder / "f").write_text("x")
        return ["train", "--config", str(env.config(folder, output_dir=str(folder / "f")))]

    def read_only_output() -> Outcome:
        folder = env.fresh("readonly")
        ro = folder / "ro"
        ro.mkdir()
        real_access = os.access
        fake = lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw)  # noqa: E731
        return run_cli(
            ["train", "--config", str(env.config(folder, output_dir=str(ro / "run")))], [(os, "access", fake)]
        )

    good_line = json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n"
    return [
        Case("no command", cli_case(lambda: [], 2)),
        Case("unknown command", cli_case(lambda: ["frobnicate"], 2)),
        Case("train without --config", cli_case(lambda: ["train"], 2, ("--config",))),
        Case("train --config missing.yaml", cli_case(lambda: ["train", "--config", str(env.root / "nope.yaml")], 2, ("nope.yaml",))),
        Case("train --config <directory>", cli_case(lambda: ["train", "--config", str(env.fresh("dir"))], 2, ("directory",))),
        Case("empty YAML", cli_case(config_file("e.yaml", b""), 2, ("empty",))),
        Case("YAML holding a list", cli_case(config_file("l.yaml", b"- a\n- b\n"), 2, ("mapping",))),
        Case("invalid YAML", cli_case(config_file("b.yaml", b"lr: [1, 2\n"), 2, ("b.yaml",))),
        Case("invalid JSON config", cli_case(config_file("b.json", b"{lr: 1"), 2, ("b.json",))),
        Case("config not UTF-8", cli_case(config_file("u.yaml", b"lr: \xff\xfe\n"), 2, ("u.yaml",))),
        Case("--resume with --fresh", cli_case(lambda: ["train", "--config", "x.yaml", "--resume", "--fresh"], 2)),
        Case("train_file missing", cli_case(data_file("train_file", lambda f: f / "missing.jsonl"), 2, ("missing.jsonl",))),
        Case("train_file is a directory", cli_case(data_file("train_file", directory), 2, ("directory",))),
        Case("train_file not UTF-8", cli_case(data_file("train_file", write("u.jsonl", good_line + b"\xff\xfe\n")), 2, ("u.jsonl:2",))),
        Case("train_file invalid JSON", cli_case(data_file("train_file", write("j.jsonl", b"{oops\n")), 2, ("j.jsonl:1",))),
        Case("train_file record without completion", cli_case(data_file("train_file", write("p.jsonl", b'{"prompt": "a"}\n')), 2, ("p.jsonl:1",))),
        Case("train_file empty", cli_case(data_file("train_file", write("e.jsonl", b"\n")), 2, ("e.jsonl",))),
        Case("train_file messages not ending with the assistant", cli_case(data_file("train_file", write("m.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n')), 2, ("m.jsonl:1",))),
        Case("eval_file invalid JSON", cli_case(data_file("eval_file", write("ej.jsonl", b"[1,\n")), 2, ("ej.jsonl",))),
        Case("model path missing", cli_case(model_path(lambda f: f / "no-model"), 2, ("no-model",))),
        Case("model: fake .gguf", cli_case(model_path(write("fake.gguf", b"not a gguf at all")), 2, ("fake.gguf",))),
        Case("model: truncated GGUF header", cli_case(model_path(write("t.gguf", b"GGUF\x03\x00")), 2, ("t.gguf",))),
        Case("model: folder without config.json", cli_case(model_path(no_config_json), 2, ("config.json",))),
        Case("model: Hub id, offline, not cached", cli_case(model_path(lambda f: Path("no-such-org/no-such-model")), 2, ("no-such-org/no-such-model", "HF_HUB_OFFLINE"))),
        Case("model: a .txt file", cli_case(model_path(write("m.txt", b"x")), 2, ("m.txt",))),
        Case("output_dir is a file", cli_case(output_dir_is_file, 2, ("output_dir",))),
        Case("output_dir read-only", lambda: judge(read_only_output(), 2, ("not writable",))),
    ]  # fmt: skip


def train_cases(env: Env) -> list[Case]:
    def resume_with(name: str, code: int, names: tuple[str, ...], *flags: str, **overrides: Any) -> Case:
        def run() -> Result:
            _, config = trained_copy(env, "resume", **overrides)
            return judge(run_cli(["train", "--config", str(config), "--resume", *flags]), code, names)

        return Case(name, run)

    def damaged_newest(damage: Callable[[Path], None], expect_step: int) -> Callable[[], Result]:
        def run() -> Result:
            folder, config = trained_copy(env, "damaged", max_steps=6)
            damage(folder / "run")
            o = run_cli(["train", "--config", str(config), "--resume", "--change-schedule"])
            verdict = judge(o, 0, before_load=False)
            if not verdict.ok:
                return verdict
            return check(
                f"at step {expect_step}" in o.err, f"resumed: {[ln for ln in o.err.splitlines() if 'resumed' in ln]}"
            )

        return run

    def remove_newest(run: Path) -> None:
        shutil.rmtree(run / "checkpoint-000004")

    def truncate_newest(run: Path) -> None:
        truncate(run / "checkpoint-000004" / "trainable.safetensors")

    def garbage_newest_optimizer(run: Path) -> None:
        (run / "checkpoint-000004" / "optimizer.safetensors").write_bytes(b"garbage" * 50)

    def all_damaged() -> Result:
        folder, config = trained_copy(env, "alldamaged")
        for ckpt in (folder / "run").glob("checkpoint-*"):
            truncate(ckpt / "trainable.safetensors")
        return judge(run_cli(["train", "--config", str(config), "--resume"]), 2, ("no intact checkpoint",))

    def legacy_checkpoint() -> Result:
        folder, config = trained_copy(env, "legacy")
        for ckpt in (folder / "run").glob("checkpoint-*"):
            (ckpt / "optimizer.safetensors").unlink()
            (ckpt / "optimizer.pt").write_bytes(b"pickle")
        return judge(run_cli(["train", "--config", str(config), "--resume"]), 2, ("older",))

    def existing_without_flag() -> Result:
        _, config = trained_copy(env, "exists")
        return judge(run_cli(["train", "--config", str(config)]), 2, ("--resume", "--fresh"))

    def fresh_replaces() -> Result:
        folder, config = trained_copy(env, "fresh")
        o = run_cli(["train", "--config", str(config), "--fresh", "--set", "max_steps=2", "--set", "save_every=0"])
        verdict = judge(o, 0, before_load=False)
        names = sorted(p.name for p in (folder / "run").glob("checkpoint-*"))
        return verdict if not verdict.ok else check(names == ["checkpoint-000002"], f"checkpoints {names}")

    def resume_without_checkpoints() -> Result:
        folder = env.fresh("nockpt")
        o = run_cli(["train", "--config", str(env.config(folder)), "--resume"])
        verdict = judge(o, 0, before_load=False)
        return verdict if not verdict.ok else check("no checkpoint" in o.err, "says it starts from step 0")

    def stale_temp_cleaned() -> Result:
        folder, config = trained_copy(env, "stale", max_steps=6)
        stale = folder / "run" / ".tmp-checkpoint-000006-999999999"
        stale.mkdir()
        (stale / "trainable.safetensors").write_bytes(b"half")
        o = run_cli(["train", "--config", str(config), "--resume", "--change-schedule"])
        verdict = judge(o, 0, before_load=False)
        return verdict if not verdict.ok else check(not stale.exists(), "stale temp folder removed")

    def disk_full() -> Result:
        import errno

        import qlora_kernels.train.checkpoint as ck

        folder = env.fresh("diskfull")
        real_save = ck.save_file
        calls = {"n": 0}

        def failing(tensors: Any, path: str, *a: Any, **kw: Any) -> None:
            calls["n"] += 1
            if calls["n"] > 3:  # the first checkpoint (3 files) succeeds
                raise OSError(errno.ENOSPC, "No space left on device", path)
            real_save(tensors, path, *a, **kw)

        o = run_cli(["train", "--config", str(env.config(folder))], [(ck, "save_file", failing)])
        verdict = judge(o, 1, ("No space left", "checkpoint-000002"), before_load=False)
        leftovers = list((folder / "run").glob(".tmp-*"))
        return verdict if not verdict.ok else check(not leftovers, f"temp folders left: {leftovers}")

    def nan_loss() -> Result:
        folder = env.fresh("nan")
        config = env.config(folder, method="full", lr=1e3, grad_clip=0.0, max_steps=20)
        return judge(run_cli(["train", "--config", str(config)]), 3, ("loss is",), before_load=False)

    def no_pickle() -> Result:
        names = {p.name for p in (env.run_dir / "checkpoint-000004").iterdir()}
        return check(not any(n.endswith((".pt", ".pkl", ".bin")) for n in names), f"files {sorted(names)}")

    def file_modes() -> Result:
        files = [env.adapter / "adapter_model.safetensors", env.adapter / "adapter_config.json"]
        files += list((env.run_dir / "checkpoint-000004").iterdir())
        modes = {f.name: oct(f.stat().st_mode & 0o777) for f in files}
        return check(all(m == "0o644" for m in modes.values()), f"modes {modes}")

    def caller_config_unchanged() -> Result:
        from qlora_kernels.train import TrainConfig, train

        folder = env.fresh("budget")
        cfg = TrainConfig.from_dict(
            {**env.base, "output_dir": str(folder / "run"), "max_steps": 9, "time_budget_s": 1e-4}
        )
        with contextlib.redirect_stderr(io.StringIO()):
            result = train(cfg)
        return check(cfg.max_steps == 9 and result.step < 9, f"cfg.max_steps {cfg.max_steps}, ran {result.step}")

    return [
        Case("train: a plain run", lambda: judge(run_cli(["train", "--config", str(env.config(env.fresh("plain")))]), 0, before_load=False)),
        Case("train: NaN loss exits 3", nan_loss),
        Case("train: existing checkpoints without --resume/--fresh", existing_without_flag),
        Case("train --fresh replaces the old run", fresh_replaces),
        Case("train --resume without checkpoints starts at 0", resume_without_checkpoints),
        resume_with("--resume, other method", 2, ("method",), method="full"),
        resume_with("--resume, other quant", 2, ("quant",), quant="int4"),
        resume_with("--resume, other r", 2, ("r: 4 -> 8",), r=8),
        resume_with("--resume, other target_modules", 2, ("target_modules",), target_modules=["q_proj"]),
        resume_with("--resume, other batch_size", 2, ("batch_size",), batch_size=2),
        resume_with("--resume, other seed", 2, ("seed",), seed=5),
        resume_with("--resume, max_steps below the checkpoint", 2, ("max_steps",), max_steps=3),
        resume_with("--resume, other max_steps", 2, ("max_steps", "--change-schedule"), max_steps=8),
        resume_with("--resume, other lr", 2, ("lr",), lr=5e-3),
        resume_with("--resume, other max_steps with --change-schedule", 0, (), "--change-schedule", max_steps=6),
        Case("--resume, newest checkpoint deleted: falls back", damaged_newest(remove_newest, 2)),
        Case("--resume, newest checkpoint truncated: falls back", damaged_newest(truncate_newest, 2)),
        Case("--resume, newest optimizer state garbage: falls back", damaged_newest(garbage_newest_optimizer, 2)),
        Case("--resume, every checkpoint damaged", all_damaged),
        Case("--resume, pickled checkpoint of an older version", legacy_checkpoint),
        Case("a stale .tmp folder is removed on the next start", stale_temp_cleaned),
        Case("disk full at a checkpoint", disk_full),
        Case("checkpoints hold no pickle", no_pickle),
        Case("saved files are mode 0644", file_modes),
        Case("train() leaves the caller's config unchanged", caller_config_unchanged),
    ]  # fmt: skip


RUNNER = """
import os, signal, sys
import qlora_kernels.train.trainer as tr
from qlora_kernels.cli import main
sig, argv = int(sys.argv[1]), sys.argv[2:]
real = tr.lr_at
def lr_at(step, **kw):
    if step == 1:
        os.kill(os.getpid(), sig)
    return real(step, **kw)
tr.lr_at = lr_at
sys.exit(main(argv))
"""


def signal_cases(env: Env) -> list[Case]:
    def stopped_by(sig: int) -> Callable[[], Result]:
        def run() -> Result:
            folder = env.fresh(f"signal{sig}")
            config = env.config(folder, max_steps=8, save_every=0)
            extra = ["--set", f"output_dir={folder / 'elsewhere'}", "--set", "lr=2e-3"]
            cmd = [sys.executable, "-c", RUNNER, str(sig), "train", "--config", str(config), *extra]
            child_env = {**os.environ, "OMP_NUM_THREADS": "1"}
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env, cwd=folder)
            run_dir = folder / "elsewhere"
            ckpts = sorted(p.name for p in run_dir.glob("checkpoint-*"))
            if p.returncode != 128 + sig or "Traceback" in p.stderr:
                return Result(False, f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
            if ckpts != ["checkpoint-000002"] or not (run_dir / "adapter").is_dir():
                return Result(False, f"checkpoints {ckpts}, adapter {(run_dir / 'adapter').is_dir()}")
            line = next((ln for ln in p.stderr.splitlines() if "Continue with:" in ln), "")
            command = line.split("Continue with:", 1)[-1].split("   (", 1)[0].strip()
            if "output_dir=" not in command or "lr=2e-3" not in command:
                return Result(False, f"resume command lacks the overrides: {command}")
            o = run_cli(shlex.split(command)[1:])  # the printed command, run as printed (minus the program name)
            verdict = judge(o, 0, before_load=False)
            if not verdict.ok:
                return verdict
            return check("at step 2" in o.err, "the printed command resumed the interrupted run")

        return run

    return [
        Case("SIGINT: checkpoint + adapter, exit 130, resume command works", stopped_by(signal.SIGINT)),
        Case("SIGTERM: checkpoint + adapter, exit 143, resume command works", stopped_by(signal.SIGTERM)),
    ]


def eval_merge_cases(env: Env) -> list[Case]:
    def adapter_with(name: str, damage: Callable[[Path], Any]) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            path = copy_adapter(env, name)
            damage(path)
            return ["eval", "--adapter", str(path), "--n", "2"]

        return argv

    def as_merge(argv_fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            args = argv_fn()
            return ["merge", "--adapter", args[2], "--out", str(env.fresh("merged") / "m")]

        return argv

    def bad_json(path: Path) -> None:
        (path / "adapter_config.json").write_text("{not json")

    def peft_without_r(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        del config["r"]
        (path / "adapter_config.json").write_text(json.dumps(config))

    def peft_only(path: Path) -> None:  # a PEFT adapter: no qlora-kernels config in the metadata
        from safetensors.torch import load_file, save_file

        file = path / "adapter_model.safetensors"
        save_file(load_file(str(file)), str(file), metadata={"format": "pt"})

    def peft_only_without_r(path: Path) -> None:
        peft_only(path)
        peft_without_r(path)

    def run_config_bad(path: Path) -> None:
        (path.parent / "train_config.json").write_text("{oops")

    def run_eval_file_missing(path: Path) -> None:
        config = json.loads((path.parent / "train_config.json").read_text())
        config["eval_file"] = str(path.parent / "gone.jsonl")
        (path.parent / "train_config.json").write_text(json.dumps(config))

    def eval_data(name: str, content: bytes | None) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            folder = env.fresh("evaldata")
            path = folder / name
            if content is None:
                path.mkdir()
            else:
                path.write_bytes(content)
            return ["eval", "--adapter", str(env.adapter), "--data", str(path)]

        return argv

    def eval_uses_run_eval_file() -> Result:
        o = run_cli(["eval", "--adapter", str(env.adapter), "--n", "2", "--show", "2"])
        verdict = judge(o, 0, before_load=False)
        if not verdict.ok:
            return verdict
        samples = o.out.count("--- sample")
        return check("the run's eval_file" in o.err and samples == 2, f"{samples} samples; {o.err.splitlines()[:1]}")

    def merge_to_file() -> Result:
        target = env.fresh("mergefile") / "model.bin"
        target.write_bytes(b"keep me")
        o = run_cli(["merge", "--adapter", str(env.adapter), "--out", str(target)])
        verdict = judge(o, 2, ("is a file",))
        return verdict if not verdict.ok else check(target.read_bytes() == b"keep me", "the file is unchanged")

    def merge_read_only() -> Outcome:
        out = env.fresh("mergero")
        real_access = os.access
        fake = lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw)  # noqa: E731
        return run_cli(["merge", "--adapter", str(env.adapter), "--out", str(out / "m")], [(os, "access", fake)])

    def merge_ok() -> Result:
        out = env.fresh("mergeok") / "m"
        o = run_cli(["merge", "--adapter", str(env.adapter), "--out", str(out), "--dtype", "fp32"])
        verdict = judge(o, 0, before_load=False)
        return verdict if not verdict.ok else check((out / "config.json").is_file(), "config.json written")

    adapter_missing = lambda: ["eval", "--adapter", str(env.root / "no-adapter")]  # noqa: E731

    def adapter_is_file() -> list[str]:
        path = env.fresh("adfile") / "adapter"
        path.write_text("x")
        return ["eval", "--adapter", str(path)]

    prompt_only = b'{"prompt": "how much?"}\n'
    return [
        Case("eval --n 0", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--n", "0"], 2, ("--n",))),
        Case("eval --n -3", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--n", "-3"], 2, ("--n",))),
        Case("eval --n x", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--n", "x"], 2, ("--n",))),
        Case("eval --show -1", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--show", "-1"], 2, ("--show",))),
        Case("eval: adapter missing", cli_case(adapter_missing, 2, ("no-adapter",))),
        Case("eval: adapter is a file", cli_case(adapter_is_file, 2, ("adapter",))),
        Case("eval: adapter_config.json malformed", cli_case(adapter_with("badjson", bad_json), 2, ("adapter_config.json",))),
        Case("eval: adapter safetensors truncated", cli_case(adapter_with("trunc", lambda p: truncate(p / "adapter_model.safetensors")), 2, ("adapter_model.safetensors",))),
        Case("eval: adapter safetensors garbage", cli_case(adapter_with("garbage", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 9)), 2, ("adapter_model.safetensors",))),
        Case("eval: NaN adapter", cli_case(adapter_with("nan", poison_adapter), 2, ("adapter_model.safetensors", "lora_", "NaN"))),
        Case("eval: PEFT config without r", cli_case(adapter_with("nor", peft_only_without_r), 2, ("'r'",))),
        Case("eval: train_config.json malformed", cli_case(adapter_with("runcfg", run_config_bad), 2, ("train_config.json",))),
        Case("eval: the run's eval_file is gone", cli_case(adapter_with("gone", run_eval_file_missing), 2, ("gone.jsonl",))),
        Case("eval --data missing", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--data", "nope.jsonl"], 2, ("nope.jsonl",))),
        Case("eval --data rows without a reference", cli_case(eval_data("p.jsonl", prompt_only), 2, ("p.jsonl:1",))),
        Case("eval --data not UTF-8", cli_case(eval_data("u.jsonl", b"\xff\n"), 2, ("u.jsonl:1",))),
        Case("eval --data is a directory", cli_case(eval_data("d.jsonl", None), 2, ("directory",))),
        Case("eval --data empty", cli_case(eval_data("e.jsonl", b""), 2, ("e.jsonl",))),
        Case("eval --model missing", cli_case(lambda: ["eval", "--adapter", str(env.adapter), "--model", str(env.root / "nomodel")], 2, ("nomodel",))),
        Case("eval: the run's eval_file by default, --show 2", eval_uses_run_eval_file),
        Case("eval --data scores", lambda: judge(run_cli(["eval", "--adapter", str(env.adapter), "--data", str(env.eval_file), "--n", "2"]), 0, before_load=False)),
        Case("merge --out is an existing file", merge_to_file),
        Case("merge --out read-only", lambda: judge(merge_read_only(), 2, ("not writable",))),
        Case("merge: NaN adapter", cli_case(as_merge(adapter_with("mnan", poison_adapter)), 2, ("NaN",))),
        Case("merge: adapter missing", cli_case(lambda: ["merge", "--adapter", str(env.root / "none"), "--out", str(env.root / "m")], 2, ("none",))),
        Case("merge: truncated adapter", cli_case(as_merge(adapter_with("mtrunc", lambda p: truncate(p / "adapter_model.safetensors"))), 2, ("adapter_model.safetensors",))),
        Case("merge --dtype fp64", cli_case(lambda: ["merge", "--adapter", str(env.adapter), "--out", "x", "--dtype", "fp64"], 2, ("--dtype",))),
        Case("merge writes a model", merge_ok),
    ]  # fmt: skip


def demo_bench_cases(env: Env) -> list[Case]:
    from benchmarks import suite

    def demo_out_file() -> list[str]:
        path = env.fresh("demofile") / "f"
        path.write_text("x")
        return ["demo", "--out", str(path)]

    def bench(argv: list[str]) -> Result:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                suite.main(argv)
        except SystemExit as e:
            return check(e.code == 2 and "error:" in err.getvalue(), err.getvalue().strip().splitlines()[-1])
        except Exception as e:
            return Result(False, f"{type(e).__name__}: {e}")
        return Result(False, "ran")

    def bench_out_file() -> Result:
        path = env.fresh("benchfile") / "f"
        path.write_text("x")
        return bench(["--out", str(path)])

    return [
        Case("demo --n-eval 0", cli_case(lambda: ["demo", "--n-eval", "0"], 2, ("--n-eval",))),
        Case("demo --n-eval -1", cli_case(lambda: ["demo", "--n-eval", "-1"], 2, ("--n-eval",))),
        Case("demo --out is a file", cli_case(demo_out_file, 2, ("--out",))),
        Case("demo --set lr=fast", cli_case(lambda: ["demo", "--out", str(env.fresh("demo")), "--set", "lr=fast"], 2, ("lr",))),
        Case("demo --set bogus=1", cli_case(lambda: ["demo", "--out", str(env.fresh("demo")), "--set", "bogus=1"], 2, ("bogus",))),
        Case("qlora-kernels bench is not an installed command", cli_case(lambda: ["bench"], 2)),
        Case("benchmarks.suite --rounds 0", lambda: bench(["--rounds", "0"])),
        Case("benchmarks.suite --rounds -1", lambda: bench(["--rounds", "-1"])),
        Case("benchmarks.suite --layer-threads -1", lambda: bench(["--layer-threads", "-1"])),
        Case("benchmarks.suite --out is a file", bench_out_file),
        Case("benchmarks.suite --suite tpu", lambda: bench(["--suite", "tpu"])),
        Case("info runs", lambda: judge(run_cli(["info"]), 0, before_load=False)),
        Case("--help texts: no reST double backquotes", lambda: help_texts_clean()),
        Case("train --help-config lists every key", lambda: help_config_complete()),
    ]  # fmt: skip


def help_texts_clean() -> Result:
    texts = []
    for command in ([], ["info"], ["train"], ["eval"], ["merge"], ["demo"]):
        o = run_cli([*command, "--help"])
        texts.append(o.out)
    bad = [t[:60] for t in texts if "``" in t or not t.strip()]
    info = texts[1]
    return check(not bad and "bits per parameter" in info, f"{len(texts)} help texts; bad: {bad}")


def help_config_complete() -> Result:
    import dataclasses

    from qlora_kernels.train import TrainConfig

    o = run_cli(["train", "--help-config"])
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in o.out]
    return check(o.code == 0 and not missing, f"missing {missing}")


def api_cases(env: Env) -> list[Case]:
    from qlora_kernels.train import ConfigError, DataError, TrainConfig, read_jsonl
    from qlora_kernels.tuning.io import read_adapter

    def load_into_fresh(path: Path) -> Any:
        model, _ = qk.load_model(env.model)
        return qk.load_adapter(model, path)

    def damaged(name: str, damage: Callable[[Path], Any]) -> Path:
        path = copy_adapter(env, name)
        damage(path)
        return path

    def merge_nan_keeps_model() -> Result:
        model, _ = qk.load_model(env.model)
        qk.load_adapter(model, env.adapter)
        lora = next(m for m in model.modules() if isinstance(m, qk.LoRALinear))
        with torch.no_grad():
            lora.lora_B.weight[0, 0] = float("nan")
        result = raises(lambda: qk.merge(model, into="fp32"), ValueError, ("NaN",))
        still = any(isinstance(m, qk.LoRALinear) for m in model.modules())
        return result if not result.ok else check(still, "the model kept its LoRA layers")

    def junk(path: Path, content: bytes) -> Path:
        path.write_bytes(content)
        return path

    folder = env.root / "api"
    folder.mkdir(exist_ok=True)
    return [
        Case("API load_adapter: NaN tensor", lambda: raises(lambda: load_into_fresh(damaged("anan", poison_adapter)), ValueError, ("adapter_model.safetensors", "lora_"))),
        Case("API load_adapter: truncated file", lambda: raises(lambda: load_into_fresh(damaged("atr", lambda p: truncate(p / "adapter_model.safetensors"))), ValueError, ("adapter_model.safetensors",))),
        Case("API load_adapter: malformed JSON", lambda: raises(lambda: read_adapter(damaged("aj", lambda p: (p / "adapter_config.json").write_text("{"))), ValueError, ("adapter_config.json",))),
        Case("API merge: NaN, model unchanged", merge_nan_keeps_model),
        Case("API read_jsonl: not UTF-8", lambda: raises(lambda: read_jsonl(junk(folder / "u.jsonl", b"\xff\n")), DataError, ("u.jsonl:1",))),
        Case("API read_jsonl: directory", lambda: raises(lambda: read_jsonl(folder), DataError, ("directory",))),
        Case("API load_model: fake .gguf", lambda: raises(lambda: qk.load_model(junk(folder / "f.gguf", b"nope")), ValueError, ("f.gguf",))),
        Case("API TrainConfig(r='8')", lambda: raises(lambda: TrainConfig(r="8"), ConfigError, ("'r'",))),
        Case("API TrainConfig(dropout=1.0)", lambda: raises(lambda: TrainConfig(dropout=1.0), ConfigError, ("dropout",))),
    ]  # fmt: skip


def library_cases(env: Env) -> list[Case]:
    """The library layer (formats, nn, prepare_model): another part of the code base, counted too."""
    from qlora_kernels.formats import QuantizedTensor

    w = torch.randn(64, 128)

    def qt_file(name: str, edit: Callable[[dict[str, torch.Tensor]], None] | None = None, cut: bool = False) -> Path:
        from safetensors.torch import load_file, save_file

        path = env.root / "lib" / name
        path.parent.mkdir(exist_ok=True)
        qk.quantize(w, "nf4").save(path)
        if edit:
            state = load_file(str(path))
            edit(state)
            save_file(state, str(path))
        if cut:
            truncate(path)
        return path

    def set_meta(index: int, value: int) -> Callable[[dict[str, torch.Tensor]], None]:
        def edit(state: dict[str, torch.Tensor]) -> None:
            state["meta"][index] = value

        return edit

    def short_meta(state: dict[str, torch.Tensor]) -> None:
        state["meta"] = state["meta"][:3].clone()

    def nan_absmax(state: dict[str, torch.Tensor]) -> None:
        key = "absmax_scales" if "absmax_scales" in state else "scales"
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")

    def cast_keeps_scales() -> Result:
        layer = qk.QuantLinear.from_linear(torch.nn.Linear(128, 64), "nf4")
        before = {n: b.dtype for n, b in layer.named_buffers() if b is not None}
        layer.to(torch.bfloat16)
        after = {n: b.dtype for n, b in layer.named_buffers() if b is not None}
        return check(before == after, f"buffer dtypes {before} -> {after}")

    def nf4_huge() -> Result:
        weight = torch.randn(64, 128)
        weight[0, 0] = 2.2e37
        try:
            out = qk.quantize(weight, "nf4", double_quant=True).dequantize(torch.float32, backend="torch")
        except (ValueError, OverflowError) as e:
            return Result(True, f"{type(e).__name__}: {e}")
        return check(bool(torch.isfinite(out).all()), "dequantized values finite")

    def lora(**kw: Any) -> Any:
        return qk.LoRALinear(torch.nn.Linear(16, 8), **{"r": 4, **kw})

    def qlora_nan_scaling() -> Any:
        qt = qk.quantize(torch.randn(8, 64), "int8")
        return qk.qlora_linear(torch.randn(2, 64), qt, torch.randn(4, 64), torch.randn(8, 4), float("nan"))

    def load_cuda() -> Any:
        if torch.cuda.is_available():
            raise RuntimeError("skipped: a GPU is present")
        return QuantizedTensor.load(qt_file("cuda.safetensors"), device="cuda")

    return [
        Case("lib QuantizedTensor.load: truncated file", lambda: raises(lambda: QuantizedTensor.load(qt_file("t.safetensors", cut=True)), ValueError, ("t.safetensors",)), "lib"),
        Case("lib QuantizedTensor.load: format id 7", lambda: raises(lambda: QuantizedTensor.load(qt_file("f7.safetensors", set_meta(1, 7))), ValueError, ("format",)), "lib"),
        Case("lib QuantizedTensor.load: format id -1", lambda: raises(lambda: QuantizedTensor.load(qt_file("fm.safetensors", set_meta(1, -1))), ValueError, ("format",)), "lib"),
        Case("lib QuantizedTensor.load: short meta", lambda: raises(lambda: QuantizedTensor.load(qt_file("sm.safetensors", short_meta)), ValueError, ("meta",)), "lib"),
        Case("lib QuantizedTensor.load: group 0", lambda: raises(lambda: QuantizedTensor.load(qt_file("g0.safetensors", set_meta(4, 0))), ValueError, ("group",)), "lib"),
        Case("lib QuantizedTensor.load: NaN absmax", lambda: raises(lambda: QuantizedTensor.load(qt_file("na.safetensors", nan_absmax)), ValueError, ("na.safetensors",)), "lib"),
        Case("lib QuantizedTensor.load(device='cuda') without a GPU", lambda: raises(load_cuda, (RuntimeError, ValueError), ("cuda",)), "lib"),
        Case("lib quantize group_size=64.0", lambda: raises(lambda: qk.quantize(w, "nf4", group_size=64.0), TypeError, ("group_size",)), "lib"),
        Case("lib quantize group_size='64'", lambda: raises(lambda: qk.quantize(w, "nf4", group_size="64"), TypeError, ("group_size", "str")), "lib"),
        Case("lib NF4 double quant, max |w| = 2.2e37", nf4_huge, "lib"),
        Case("lib qlora_linear(scaling=nan)", lambda: raises(qlora_nan_scaling, ValueError, ("scaling",)), "lib"),
        Case("lib LoRALinear(r=True)", lambda: raises(lambda: lora(r=True), TypeError, ("r",)), "lib"),
        Case("lib LoRALinear(alpha='32')", lambda: raises(lambda: lora(alpha="32"), TypeError, ("alpha",)), "lib"),
        Case("lib LoRALinear(alpha=nan)", lambda: raises(lambda: lora(alpha=math.nan), ValueError, ("alpha",)), "lib"),
        Case("lib prepare_model('model')", lambda: raises(lambda: qk.prepare_model("model"), TypeError, ("model",)), "lib"),
        Case("lib QuantLinear.to(bfloat16) keeps the packed buffers", cast_keeps_scales, "lib"),
    ]  # fmt: skip


# -------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run only the cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="also print the detail of passing cases")
    parser.add_argument("--target", type=int, default=TARGET)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qk-sweep-"))
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            env = make_env(root)
        groups = [config_cases, file_cases, train_cases, signal_cases, eval_merge_cases, demo_bench_cases]
        groups += [api_cases, library_cases]
        cases = [c for group in groups for c in group(env) if args.k in c.name]
        passed = {"app": 0, "lib": 0}
        totals = {"app": 0, "lib": 0}
        for case in cases:
            try:
                result = case.run()
            except Exception as e:
                result = Result(False, f"the case itself failed: {type(e).__name__}: {e}")
            totals[case.area] += 1
            passed[case.area] += result.ok
            if not result.ok or args.verbose:
                print(f"{'ok  ' if result.ok else 'BAD '} [{case.area}] {case.name}: {result.detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total, good = sum(totals.values()), sum(passed.values())
    print(
        f"handled well: {good}/{total} (application layer {passed['app']}/{totals['app']}, "
        f"library layer {passed['lib']}/{totals['lib']}) in {time.perf_counter() - t0:.0f}s"
    )
    return 0 if good >= min(args.target, total) else 1


if __name__ == "__main__":
    sys.exit(main())
