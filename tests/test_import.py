"""Importing the package: idle OpenMP threads sleep (as under the CLI) unless torch came first or the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_POLICY = "import os; {first}import qlora_kernels; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("first", "preset", "expected"),
    [("", None, "PASSIVE"), ("import torch; ", None, "None"), ("", "ACTIVE", "ACTIVE")],
)
def test_openmp_wait_policy_at_import(first, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run(
        [sys.executable, "-c", PRINT_POLICY.format(first=first)], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == expected
