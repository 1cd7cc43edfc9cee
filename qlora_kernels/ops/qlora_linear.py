"""`qlora_linear`: y = x @ dequant(W)^T + scaling * (x @ A^T) @ B^T (+ bias), with autograd.

Three layers, as in the rest of the package:
* `qlora_linear_ref`: plain differentiable PyTorch in fp32 on the dequantized weight, the
  oracle of every test (and of `torch.autograd.gradcheck`).
* `QLoRALinearFunction`: the memory-lean autograd function. It saves x and x @ A^T only and
  decodes W again in the backward instead of keeping a dense copy; the forward/backward
  arithmetic comes from a backend ("torch" here, "triton" from `qlora_kernels.kernels`).
* `qlora_linear`: checks the arguments, applies autocast, picks the backend, flattens (..., K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..common import FLOAT_DTYPES, check_real
from ..formats import QuantizedTensor
from ..formats.backends import auto_backend
from .compute_policy import cpu_matmul_dtype
from .native import fused_small_m_applies, fused_small_m_forward, native_available, workspace


# --------------------------------------------------------------------------- reference
def qlora_linear_ref(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: fp32 math on the dequantized weight (fp64 if x is fp64), output in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = qt.dequantize(torch.float32, backend="torch").to(compute)
    xc = x.to(compute)
    y = xc @ w.t()
    if lora_a is not None:
        y = y + scaling * ((xc @ lora_a.to(compute).t()) @ lora_b.to(compute).t())
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- backends
class QLoRABackend(Protocol):
    """The arithmetic an autograd backend provides, on flattened 2-D x (M, K)."""

    def forward(
        self, x: torch.Tensor, qt: QuantizedTensor, lora_a, lora_b, scaling: float, bias
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (y (M, N) in x's dtype, xa = x @ A^T (M, r) as an fp32 tensor, or None without LoRA).

        xa is accumulated in fp32 by every backend. In the CPU's bf16 compute mode (see
        `compute_policy`) it is then rounded to bf16 like every other product of that mode, as
        PEFT's LoRA is under bf16 autocast; everywhere else it keeps its fp32 value.
        """

    def grad_input(self, dy: torch.Tensor, qt: QuantizedTensor, lora_a, lora_b, scaling: float) -> torch.Tensor:
        """dX = dY @ W + scaling * (dY @ B) @ A, (M, K) in dy's dtype."""


class TorchBackend:
    """PyTorch matmuls on a decoded weight (the CPU path; any device).

    decode="torch": the pure reference decode into a fresh tensor (``backend="torch"``).
    decode="native": the C++ extension decodes into one reused buffer, so no dense weight is
    allocated per layer call (``backend="native"``, and ``"auto"`` on the CPU when built).

    The compute dtype follows `compute_policy.cpu_matmul_dtype`: bf16 inputs on a host whose bf16
    GEMM is fast are multiplied in bf16 (oneDNN accumulates in fp32), the weight decoded straight
    into bf16 and the LoRA path in bf16 too, as PEFT does under bf16 autocast; everything else is
    computed in fp32. Off the CPU this backend always computes in fp32.

    At small M the "native" forward runs the fused kernel instead (`native.fused_small_m_forward`:
    the weight decoded in registers, LoRA and bias in the same pass, fp32 accumulation).
    """

    def __init__(self, decode: str = "torch") -> None:
        self.decode = decode

    @staticmethod
    def compute_dtype(x: torch.Tensor) -> torch.dtype:
        return cpu_matmul_dtype(x.dtype) if x.device.type == "cpu" else torch.float32

    def _matmul(self, x: torch.Tensor, qt: QuantizedTensor, transpose: bool) -> torch.Tensor:
        if self.decode == "native":
            return workspace().matmul(x, qt, transpose=transpose)
        w = qt.dequantize(x.dtype, backend=self.decode)
        return x @ (w.t() if transpose else w)

    def forward(self, x, qt, lora_a, lora_b, scaling, bias):
        if self.decode == "native" and fused_small_m_applies(x, qt):  # small M: decode in registers, one pass
            return fused_small_m_forward(x, qt, lora_a, lora_b, scaling, bias)
        compute = self.compute_dtype(x)
        xc = x.to(compute)
        y = self._matmul(xc, qt, transpose=True)
        xa = None
        if lora_a is not None:
            xa = xc @ lora_a.to(compute).t()
            y.addmm_(xa, lora_b.to(compute).t(), alpha=scaling)
            xa = xa.float()
        if bias is not None:
            y += bias.to(compute)
        return y.to(x.dtype), xa

    def grad_input(self, dy, qt, lora_a, lora_b, scaling):
        compute = self.compute_dtype(dy)
        dyc = dy.to(compute)
        dx = self._matmul(dyc, qt, transpose=False)
        if lora_a is not None:
            dx.addmm_(dyc @ lora_b.to(compute), lora_a.to(compute), alpha=scaling)
        return dx.to(dy.dtype)


def lora_weight_grads(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    xa: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    compute: torch.dtype,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dA, dB) in the parameters' dtypes: dB = s * dY^T (x A^T), dA = s * (dY B)^T x, rank first."""
    dyc = dy.to(compute)
    da = db = None
    if need_b:
        db = (dyc.t() @ xa.to(compute)).to(lora_b.dtype).mul_(scaling)
    if need_a:
        da = ((dyc @ lora_b.to(compute)).t() @ x.to(compute)).to(lora_a.dtype).mul_(scaling)
    return da, db


_BACKEND_IMPLS: dict[str, QLoRABackend] = {"torch": TorchBackend("torch"), "native": TorchBackend("native")}
#: Loaded on first use, so that importing the package never imports Triton.
_LAZY_BACKENDS = ("triton",)


def register_qlora_backend(name: str, impl: QLoRABackend) -> None:
    """Make `impl` selectable as ``qlora_linear(..., backend=name)`` (and ``QuantLinear(backend=name)``)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_qlora_backend: name must be a non-empty string other than 'auto', got {name!r}")
    missing = [m for m in ("forward", "grad_input") if not callable(getattr(impl, m, None))]
    if missing:
        raise TypeError(
            f"register_qlora_backend: impl must provide forward() and grad_input() (see QLoRABackend); "
            f"{type(impl).__name__} lacks {missing}"
        )
    _BACKEND_IMPLS[name] = impl


def qlora_backend_names() -> tuple[str, ...]:
    """Every name ``qlora_linear(backend=...)`` accepts."""
    return ("auto", *_BACKEND_IMPLS, *(n for n in _LAZY_BACKENDS if n not in _BACKEND_IMPLS))


def _triton_backend() -> QLoRABackend:
    if "triton" not in _BACKEND_IMPLS:
        try:
            from ..kernels.qlora_ops import TritonBackend
        except ImportError as err:  # triton missing, or the kernel module not present
            raise RuntimeError(f"backend='triton' is unavailable: {err}") from err
        _BACKEND_IMPLS["triton"] = TritonBackend()
    return _BACKEND_IMPLS["triton"]


def check_backend_name(backend: object) -> str:
    """`backend` unchanged if ``qlora_linear`` accepts it, else a TypeError/ValueError listing the names."""
    if not isinstance(backend, str):
        raise TypeError(f"qlora_linear: backend must be a string, got {type(backend).__name__}")
    if backend not in qlora_backend_names():
        raise ValueError(f"qlora_linear: backend must be one of {qlora_backend_names()}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> QLoRABackend:
    """The implementation for `backend` on `device` ("auto": `formats.backends.auto_backend`'s choice)."""
    name = auto_backend(device) if check_backend_name(backend) == "auto" else backend
    if name == "triton":
        return _triton_backend()
    if name == "native":
        if device.type != "cpu":
            raise ValueError(f"qlora_linear: backend='native' runs on the CPU only, got tensors on {device}")
        if not native_available():
            raise ValueError(
                "qlora_linear: backend='native' needs the C++ extension, which is not built; rebuild with "
                "QK_BUILD_NATIVE=1 pip install --no-build-isolation -e . (or use backend='torch')"
            )
    return _BACKEND_IMPLS[name]


# ------------------------------------------------------------------------------ autograd
@dataclass(frozen=True)
class _Static:
    qt: QuantizedTensor
    scaling: float
    backend: QLoRABackend


class QLoRALinearFunction(torch.autograd.Function):
    """Saves x and x @ A^T; the base weight gets no gradient and is decoded again in backward."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, static: _Static):
        y, xa = static.backend.forward(x, static.qt, lora_a, lora_b, static.scaling, bias)
        ctx.static = static
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x if lora_a is not None and ctx.needs_input_grad[1] else None, xa, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b, need_bias, _ = ctx.needs_input_grad
        grads = linear_backward(
            dy, x, xa, lora_a, lora_b, ctx.static, need_x, need_a, need_b, need_bias and ctx.has_bias, ctx.bias_dtype
        )
        return (*grads, None)


def linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    xa: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    static: _Static,
    need_x: bool,
    need_a: bool,
    need_b: bool,
    need_bias: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB, dbias) of one quantized LoRA linear from dY (M, N) and what its forward saved.

    x (M, K) is needed for dA only, xa = x A^T for dB; the base weight is decoded again for dX.
    """
    dx = da = db = dbias = None
    dy = dy.contiguous()
    if need_x:
        dx = static.backend.grad_input(dy, static.qt, lora_a, lora_b, static.scaling)
    if lora_a is not None and (need_a or need_b):
        compute = getattr(static.backend, "compute_dtype", lambda _: torch.float32)(dy)
        da, db = lora_weight_grads(dy, x, xa, lora_a, lora_b, static.scaling, compute, need_a, need_b)
    if need_bias:
        dbias = dy.float().sum(0).to(bias_dtype)
    return dx, da, db, dbias


# ------------------------------------------------------------------------------ checks
def check_qlora_args(x, qt, lora_a, lora_b, scaling, bias) -> None:
    """Clear TypeError/ValueError for every argument `qlora_linear` cannot take."""
    check_real(scaling, "qlora_linear: scaling")
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qlora_linear: qt must be a QuantizedTensor (qk.quantize(...)), got {type(qt).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"qlora_linear: x must be a bfloat16, float16 or float32 tensor, got {got}")
    n, k = qt.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"qlora_linear: x's last dimension must equal in_features K={k}, got x of shape {tuple(x.shape)}"
        )
    if (lora_a is None) != (lora_b is None):
        raise ValueError("qlora_linear: pass both lora_a and lora_b, or neither (no LoRA)")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"qlora_linear: {name} must be a tensor or None, got {type(t).__name__}")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise ValueError("qlora_linear: lora_a must be (r, K) and lora_b (N, r)")
        r = lora_a.shape[0]
        if lora_a.shape != (r, k):
            raise ValueError(f"qlora_linear: lora_a must have shape (r, K)=({r}, {k}), got {tuple(lora_a.shape)}")
        if lora_b.shape != (n, r):
            raise ValueError(
                f"qlora_linear: lora_b must have shape (N, r)=({n}, {r}) to match lora_a, got {tuple(lora_b.shape)}"
            )
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"qlora_linear: {name} must be a float tensor, got {t.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"qlora_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, qt.data, lora_a, lora_b, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            "qlora_linear: x, the weight, lora_a/lora_b and bias must be on one device, "
            f"got {sorted(map(str, devices))}"
        )


def qlora_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x @ dequant(W)^T + scaling * (x @ A^T) @ B^T (+ bias), accumulated in fp32.

    x: (..., K) in bf16, fp16 or fp32; W: qt of shape (N, K); lora_a: (r, K); lora_b: (N, r);
    ``lora_a=None`` means a plain quantized linear. Output: (..., N) in x's dtype (or the
    autocast dtype inside an autocast region). backend: ``"auto"`` (Triton on CUDA; on the CPU
    the native decode into a reused buffer when built, else PyTorch), ``"triton"``, ``"native"``
    or ``"torch"`` (the pure-PyTorch decode).
    """
    check_qlora_args(x, qt, lora_a, lora_b, scaling, bias)
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    if autocast_on:
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
    impl = resolve_backend(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, lora_a, lora_b, bias)):
        with torch.autocast(device_type, enabled=False):
            y = QLoRALinearFunction.apply(x2, lora_a, lora_b, bias, _Static(qt, float(scaling), impl))
    elif autocast_on:  # nothing to differentiate (generation, evaluation): the backend's forward without autograd
        with torch.autocast(device_type, enabled=False):
            y, _ = impl.forward(x2, qt, lora_a, lora_b, float(scaling), bias)
    else:
        y, _ = impl.forward(x2, qt, lora_a, lora_b, float(scaling), bias)
    return y.reshape(*lead, qt.shape[0])
