"""The bottom layer: argument checks, atomic writes, safetensors reads that name the file, shared constants."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qlora_kernels.common import (
    IGNORE_INDEX,
    atomic_write,
    check_bool,
    check_device,
    check_int,
    check_real,
    load_safetensors,
)

PACKAGE = Path(importlib.import_module("qlora_kernels").__file__).parent


@pytest.mark.parametrize("value", [True, False, 3.0, "3", None, torch.tensor(3)])
def test_check_int_refuses_non_integers_and_bools(value):
    with pytest.raises(TypeError, match="n must be an integer"):
        check_int(value, "n")


def test_check_int_range_and_numpy():
    np = pytest.importorskip("numpy")
    assert check_int(np.int32(5), "n", minimum=1) == 5 and type(check_int(np.int32(5), "n")) is int
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        check_int(0, "n", minimum=1)


@pytest.mark.parametrize(
    "value,exc", [(True, TypeError), ("1.0", TypeError), (float("nan"), ValueError), (-float("inf"), ValueError)]
)
def test_check_real_refuses_bools_strings_and_non_finite(value, exc):
    with pytest.raises(exc, match="x must be a"):
        check_real(value, "x")
    assert check_real(2, "x") == 2.0


def test_check_bool():
    assert check_bool(False, "flag") is False
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        check_bool(1, "flag")


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        check_device(0.5)
    with pytest.raises(ValueError, match="not a device name"):
        check_device("graphics-card")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            check_device("cuda:0")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "latest"
    atomic_write(path, lambda tmp: tmp.write_text("one"))
    assert path.read_text() == "one"

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"], "a temp file was left behind"


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_atomically_written_files_get_the_mode_of_any_new_file(tmp_path, umask):
    """Temp files start at 0600; a saved weight must be as readable as a file written with open()."""
    import qlora_kernels as qk

    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "text", lambda tmp: tmp.write_text("x"))
        qk.quantize(torch.randn(8, 64), "nf4").save(tmp_path / "w.safetensors")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"text": 0o666 & ~umask, "w.safetensors": 0o666 & ~umask, "plain": 0o666 & ~umask}


def test_load_safetensors_errors_name_the_file(tmp_path):
    good = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(2)}, str(good))
    assert torch.equal(load_safetensors(good)["x"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.safetensors")):
        load_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{bad} is not a readable safetensors file"):
        load_safetensors(bad)


def test_ignore_index_is_defined_once_and_imported_by_its_users():
    defined = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets):
                defined.append(path.relative_to(PACKAGE).as_posix())
    assert defined == ["common/constants.py"]
    for module in ("ops.linear_cross_entropy", "train.data", "tuning.prompt"):
        assert importlib.import_module(f"qlora_kernels.{module}").IGNORE_INDEX is IGNORE_INDEX


def test_common_imports_nothing_from_the_rest_of_the_package():
    for path in (PACKAGE / "common").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                upward = node.level > 1 or (node.module or "").startswith("qlora_kernels")
                assert not upward, f"{path.name} imports from a layer above: {ast.unparse(node)}"
