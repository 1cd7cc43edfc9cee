"""Test harness: Triton's interpreter on the CPU (with its bf16 fixes), seeds, GPU marker."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made small
# matmuls ~30x slower. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The CPU compute dtype is chosen per machine (qlora_kernels.ops.compute_policy); tests pin fp32 so
# their tolerances hold on every machine, and the bf16 path is tested by choosing it explicitly.
os.environ.setdefault("QK_CPU_DTYPE", "fp32")

# Must be set before any @triton.jit decorator runs, i.e. before the kernel modules import.
if not os.environ.get("QK_TEST_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton_interpreter  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    triton_interpreter.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _reset_cpu_compute_dtype():
    """A run with dtype bf16/fp32 fixes the process's CPU compute dtype; each test starts from the pinned one."""
    yield
    from qlora_kernels.ops.compute_policy import set_cpu_compute_dtype

    set_cpu_compute_dtype(None)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present, else the CPU (Triton kernels then run in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32, loaded once per session (skips if not installed).

    Shared: never modify it; take ``copy.deepcopy(model)`` (135M params, cheap) for each test.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qlora_kernels as qk

    try:
        return qk.load_model("smollm2-135m-instruct", dtype=torch.float32)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
