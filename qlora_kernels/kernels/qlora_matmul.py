"""Fused QLoRA matmul on packed weights: the Triton kernel and its launchers (small M).

Forward:  y  = x  @ dequant(W)^T + scaling * (x  @ A^T) @ B^T (+ bias)      x: (M, K), W: (N, K)
Backward: dx = dy @ dequant(W)   + scaling * (dy @ B)   @ A                 dy: (M, N)

Both are the same shape of computation, so one kernel (`_qlora_matmul_kernel`) serves both
with a constexpr MODE: an output tile (BLOCK_M, BLOCK_OUT) accumulates over a reduced dim in
BLOCK_RED steps; each step decodes a W tile in registers (`load_weight_tile`) and also
accumulates the LoRA down-projection (x @ A^T, or dy @ B) from the same activation tile; the
epilogue adds the up-projection (side @ B^T, or side @ A) and the bias. W is never dense in
memory on this path, and the backward decodes it again rather than keeping it from the forward.

At M <= SPLIT_K_MAX_M the forward may also split K (SPLIT_K > 1 configs): SPLIT_K programs
per output tile write fp32 partials, and the last of them to arrive (a per-tile atomic
counter) sums them in split order and runs the epilogue once, so the result is reproducible
bit for bit and the LoRA up-projection and bias are added exactly once.

The launchers own the kernel's input contract (`check_operands`): shapes of x, the weight,
A, B and bias, dtypes, one device; strided x, A and B are read through their strides, a
strided bias is copied (the kernel reads it with unit stride), and the outputs are allocated
here, row-major. Configs and their pruning live in `qlora_configs`, the large-M path in
`qlora_dense`, dispatch by M and the torch.library ops in `qlora_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import FLOAT_DTYPES
from ..formats import FORMAT_IDS, QuantizedTensor
from ._runtime import check_launchable, device_key
from .dequant import scales_row_stride, weight_kernel_args, weight_meta
from .qlora_configs import (
    MODE_FORWARD,
    MODE_GRAD_INPUT,
    kernel_configs,
    lora_r_pad,
    m_bucket,
    prune_configs,
    valid_configs,
)
from .weight_tile import load_weight_tile

#: Activation (and output) dtypes the kernels take.
ACTIVATION_DTYPES = FLOAT_DTYPES


# ---------------------------------------------------------------------------- the kernel
# M and M_BUCKET are not specialized: otherwise M = 1 (a constexpr) and M % 16 == 0 (a
# divisibility hint) would each compile every config again, and decoding, prefill and training
# batches would pay three compiles per config for masks that cost nothing at run time.
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _qlora_matmul_kernel(
    # pointers: activation (x or dy), packed weight (6, see weight_kernel_args), LoRA, bias, outputs
    act_ptr,
    data_ptr,
    scales_ptr,
    mins_ptr,
    absmax_scales_ptr,
    absmax_offset_ptr,
    nested_table_ptr,
    down_ptr,
    up_ptr,
    bias_ptr,
    out_ptr,
    side_ptr,
    # split-K workspace (SPLIT_K > 1 only): fp32 partial outputs, partial sides, tile counters
    part_ptr,
    part_side_ptr,
    counter_ptr,
    # sizes
    M,
    N,
    K,
    R,
    M_BUCKET,  # only an autotune key (bucketed M); unused by the body
    # strides
    stride_act_m,
    stride_act_red,
    stride_data_n,
    stride_scales_n,
    stride_down_red,
    stride_down_r,
    stride_up_r,
    stride_up_out,
    stride_out_m,
    stride_side_m,
    # scalars
    scaling,
    # meta-parameters
    MODE: tl.constexpr,
    FORMAT: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_SIDE: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_RED: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """MODE_FORWARD: out = act @ W^T + s * (act @ down) @ up + bias, reduced over K.
    MODE_GRAD_INPUT: out = act @ W + s * (act @ down) @ up, reduced over N.

    down is read as a (RED, R) matrix and up as (R, OUT) through strides, so A (r, K) and
    B (N, r) need no transposed copies in either mode. side = act @ down (fp32) is stored
    when STORE_SIDE (the forward's x @ A^T for the backward).

    SPLIT_K > 1 (forward only): program (o, m, s) reduces the s-th of SPLIT_K contiguous
    slices of K steps and stores its fp32 partial out tile and partial side in the workspace;
    the last of the SPLIT_K programs of a tile to arrive (a per-tile counter) sums the
    partials in split order 0..SPLIT_K-1 and runs the epilogue (LoRA up-projection on the
    full side, bias) once, then resets the counter for the next launch.

    BLOCK_M = 1 (forward only): no tensor cores. The decoded tile is multiplied by the x row in
    the registers it was loaded into and summed once at the end (a GEMV): the MMA path would
    pad M to 16 and move every decoded tile through shared memory into the operand layout.
    """
    tl.static_assert(SPLIT_K == 1 or MODE == 0, "split-K is for the forward only")
    pid_out = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    if FORMAT != 0:
        # GROUP divides K for the 4-bit formats: writing K as a multiple of the constexpr GROUP
        # tells the compiler that the K-mask of a packed row is constant over >= 16 bytes, so
        # the weight loads can be 128-bit (with K alone it only knows K % 16 == 0: 8-byte runs).
        K = (K // GROUP) * GROUP
    if MODE == 0:
        OUT_SIZE = N
        RED_SIZE = K
    else:
        OUT_SIZE = K
        RED_SIZE = N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_out = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_out = offs_out < OUT_SIZE
    act_rows = act_ptr + offs_m.to(tl.int64)[:, None] * stride_act_m

    USE_DOT: tl.constexpr = BLOCK_M >= 16
    tl.static_assert(USE_DOT or (BLOCK_M == 1 and MODE == 0), "BLOCK_M < 16 is the forward's GEMV, BLOCK_M = 1")
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_OUT, BLOCK_M), dtype=tl.float32)  # forward accumulates out^T (swap AB)
    side = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if not USE_DOT:  # GEMV: element-wise partial products, summed after the loop
        acc_gemv = tl.zeros((BLOCK_OUT, BLOCK_RED), dtype=tl.float32)
        side_gemv = tl.zeros((BLOCK_RED, R_PAD), dtype=tl.float32)
    n_steps = tl.cdiv(RED_SIZE, BLOCK_RED)
    if SPLIT_K == 1:  # a loop from the constant 0 (pid_k * n_steps costs the backward 8 B of spills)
        step_lo = 0
        step_hi = n_steps
    else:  # contiguous slices of ceil(n_steps / SPLIT_K) steps; trailing ones may be empty
        steps_per_split = tl.cdiv(n_steps, SPLIT_K)
        step_lo = pid_k * steps_per_split
        step_hi = tl.minimum(step_lo + steps_per_split, n_steps)
    for step in range(step_lo, step_hi):
        red0 = tl.multiple_of(step * BLOCK_RED, BLOCK_RED)
        offs_red = red0 + tl.arange(0, BLOCK_RED)
        mask_red = offs_red < RED_SIZE
        act = tl.load(
            act_rows + offs_red.to(tl.int64)[None, :] * stride_act_red,
            mask=mask_m[:, None] & mask_red[None, :],
            other=0.0,
        )
        if MODE == 0:  # W tile (BLOCK_OUT rows of N, BLOCK_RED columns of K) as the A operand:
            # out^T = W @ x^T puts the wide N tile on the MMA's M side (wgmma on sm_90 even at M=1)
            w = load_weight_tile(
                data_ptr, scales_ptr, mins_ptr, absmax_scales_ptr, absmax_offset_ptr, nested_table_ptr,
                offs_out, red0, N, K, stride_data_n, stride_scales_n,
                FORMAT, GROUP, SYMMETRIC, DOUBLE_QUANT, BLOCK_OUT, BLOCK_RED,
            )  # fmt: skip
            if USE_DOT:
                acc_t = tl.dot(w.to(act.dtype), tl.trans(act), acc_t, input_precision="ieee")
            else:  # the same bf16-rounded operands as the dot, products exact in fp32
                acc_gemv += w.to(act.dtype).to(tl.float32) * act.to(tl.float32)
        else:  # W tile (BLOCK_RED rows of N, BLOCK_OUT columns of K)
            k0 = tl.multiple_of(pid_out * BLOCK_OUT, BLOCK_OUT)
            w = load_weight_tile(
                data_ptr, scales_ptr, mins_ptr, absmax_scales_ptr, absmax_offset_ptr, nested_table_ptr,
                offs_red, k0, N, K, stride_data_n, stride_scales_n,
                FORMAT, GROUP, SYMMETRIC, DOUBLE_QUANT, BLOCK_RED, BLOCK_OUT,
            )  # fmt: skip
            acc = tl.dot(act, w.to(act.dtype), acc, input_precision="ieee")
        if HAS_LORA:
            down_offs = offs_red.to(tl.int64)[:, None] * stride_down_red + offs_r[None, :] * stride_down_r
            down = tl.load(down_ptr + down_offs, mask=mask_red[:, None] & (offs_r < R)[None, :], other=0.0)
            if USE_DOT:
                side = tl.dot(act, down.to(tl.float32).to(act.dtype), side, input_precision="ieee")
            else:
                side_gemv += tl.trans(act).to(tl.float32) * down.to(tl.float32).to(act.dtype).to(tl.float32)

    if not USE_DOT:
        acc = tl.reshape(tl.sum(acc_gemv, axis=1), (1, BLOCK_OUT))
        side = tl.reshape(tl.sum(side_gemv, axis=0), (1, R_PAD))
    elif MODE == 0:
        acc = tl.trans(acc_t)
    if SPLIT_K == 1:
        _epilogue(
            acc, side, up_ptr, bias_ptr, out_ptr, side_ptr, offs_m, offs_out, offs_r, mask_m, mask_out, pid_out, R,
            stride_up_r, stride_up_out, stride_out_m, stride_side_m, scaling, HAS_LORA, HAS_BIAS, STORE_SIDE, USE_DOT,
        )  # fmt: skip
    else:
        rows = offs_m.to(tl.int64)
        mask_mo = mask_m[:, None] & mask_out[None, :]
        part_rows = rows[:, None] * OUT_SIZE + offs_out[None, :]  # + split * M * OUT_SIZE
        tl.store(part_ptr + pid_k * M * OUT_SIZE + part_rows, acc, mask=mask_mo)
        # partial sides per (out tile, split): the last program of a tile reads its tile's only
        side_rows = rows[:, None] * R_PAD + offs_r[None, :]  # + (o * SPLIT_K + split) * M * R_PAD
        side_tile = pid_out.to(tl.int64) * SPLIT_K * M * R_PAD
        if HAS_LORA:
            tl.store(part_side_ptr + side_tile + pid_k * M * R_PAD + side_rows, side, mask=mask_m[:, None])
        # Every thread's partial stores happen before the release (bar.sync, then one thread's
        # acq_rel atomic: CUTLASS's split-K semaphore pattern); the last program reads the
        # partials through L2 (.cg), after its acquire.
        tl.debug_barrier()
        counter = counter_ptr + pid_m * tl.num_programs(0) + pid_out
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
            side_total = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):  # fixed order: bitwise deterministic
                total += tl.load(
                    part_ptr + split * M * OUT_SIZE + part_rows, mask=mask_mo, other=0.0, cache_modifier=".cg"
                )
                if HAS_LORA:
                    side_total += tl.load(
                        part_side_ptr + side_tile + split * M * R_PAD + side_rows,
                        mask=mask_m[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            _epilogue(
                total, side_total, up_ptr, bias_ptr, out_ptr, side_ptr, offs_m, offs_out, offs_r, mask_m, mask_out,
                pid_out, R, stride_up_r, stride_up_out, stride_out_m, stride_side_m, scaling, HAS_LORA, HAS_BIAS,
                STORE_SIDE, USE_DOT,
            )  # fmt: skip


@triton.jit
def _epilogue(
    acc,
    side,
    up_ptr,
    bias_ptr,
    out_ptr,
    side_ptr,
    offs_m,
    offs_out,
    offs_r,
    mask_m,
    mask_out,
    pid_out,
    R,
    stride_up_r,
    stride_up_out,
    stride_out_m,
    stride_side_m,
    scaling,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_SIDE: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """out = acc + scaling * side @ up + bias on one (BLOCK_M, BLOCK_OUT) tile; side stored by pid_out 0."""
    if HAS_LORA:
        # Rank-first up-projection in fp32 (R_PAD x BLOCK_OUT per tile: negligible work).
        up_offs = offs_r[:, None] * stride_up_r + offs_out.to(tl.int64)[None, :] * stride_up_out
        up = tl.load(up_ptr + up_offs, mask=(offs_r < R)[:, None] & mask_out[None, :], other=0.0).to(tl.float32)
        if USE_DOT:
            acc += scaling * tl.dot(side, up, input_precision="ieee")
        else:  # BLOCK_M = 1: side (1, R_PAD) times up (R_PAD, BLOCK_OUT), summed over the rank
            acc += scaling * tl.reshape(tl.sum(tl.trans(side) * up, axis=0), acc.shape)
        if STORE_SIDE:
            # Every OUT-tile program computes `side` (it needs it for its own epilogue; A is
            # r x K, tiny next to the BLOCK_OUT x K weight slice, and L2-resident), so the
            # first column of programs writes it: no second pass over x, no atomics.
            if pid_out == 0:
                side_offs = offs_m.to(tl.int64)[:, None] * stride_side_m + offs_r[None, :]
                tl.store(side_ptr + side_offs, side, mask=mask_m[:, None] & (offs_r < R)[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_out, mask=mask_out, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * stride_out_m + offs_out[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_out[None, :])


# ------------------------------------------------------------------------------ autotune
#: Autotuning times each candidate with do_bench for this many ms (after a warm-up of
#: AUTOTUNE_WARMUP_MS): 20 ms is >= 300 runs of the slowest small-M kernel (~60 us at M = 64,
#: 14336 x 4096), enough to rank configs, and keeps a first call at a new shape under a second.
AUTOTUNE_REP_MS = 20
AUTOTUNE_WARMUP_MS = 5


def _autotune_bench(kernel_call, quantiles):
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _tuned(mode: int):
    return triton.autotune(
        configs=kernel_configs(mode),
        key=["M_BUCKET", "N", "K", "R_PAD", "FORMAT", "GROUP", "HAS_LORA", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": prune_configs},
        do_bench=_autotune_bench,
    )(_qlora_matmul_kernel)


# One autotuner per mode, so forward and backward keep separate tuning caches.
_forward_tuned = _tuned(MODE_FORWARD)
_grad_input_tuned = _tuned(MODE_GRAD_INPUT)


def autotuner(mode: int):
    """The autotuned kernel of `mode` (its `.configs` and `.cache` are what benchmarks force)."""
    return _forward_tuned if mode == MODE_FORWARD else _grad_input_tuned


# ------------------------------------------------------------------------- input contract
def check_operands(
    act: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    bias: torch.Tensor | None,
    mode: int,
    op: str,
) -> None:
    """Raise ValueError/TypeError naming the argument unless the kernels can take these operands.

    act is x (M, K) in the forward and dy (M, N) in the backward, 2-D, bf16/fp16/fp32; lora_a
    (r, K) and lora_b (N, r) together or not at all, floating; bias (N,) floating (forward
    only); every tensor on one device where Triton runs. Strides are free (x, A, B are read
    through them; `_launch` copies a strided bias).
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{op}: qt must be a QuantizedTensor, got {type(qt).__name__}")
    check_launchable(act, qt.data, lora_a, lora_b, bias, op=op)
    n, k = qt.shape
    if act.dim() != 2:
        raise ValueError(f"{op}: the activation must be 2-D (M, features), got shape {tuple(act.shape)}")
    if act.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: the activation must be bf16, fp16 or fp32, got {act.dtype}")
    name, want = ("x", k) if mode == MODE_FORWARD else ("dy", n)
    if act.shape[1] != want:
        raise ValueError(
            f"{op}: {name} must have {want} columns to match the weight of shape (N, K)=({n}, {k}), "
            f"got {tuple(act.shape)}"
        )
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{op}: pass both lora_a and lora_b, or neither")
    if lora_a is not None:
        r = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if lora_a.dim() != 2 or r < 1 or lora_a.shape[1] != k:
            raise ValueError(f"{op}: lora_a must have shape (r, K)=(r, {k}) with r >= 1, got {tuple(lora_a.shape)}")
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
            raise ValueError(f"{op}: lora_b must be (N, r)=({n}, {r}) to match lora_a, got {tuple(lora_b.shape)}")
        for arg, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype not in ACTIVATION_DTYPES:
                raise TypeError(f"{op}: {arg} must be bf16, fp16 or fp32, got {t.dtype}")
    if bias is not None:
        if mode != MODE_FORWARD:
            raise ValueError(f"{op}: bias is a forward-only operand")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"{op}: bias must have shape (N,)=({n},), got {tuple(bias.shape)}")
        if bias.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{op}: bias must be bf16, fp16 or fp32, got {bias.dtype}")


# ---------------------------------------------------------------------- split-K workspace
class _SplitKWorkspace:
    """fp32 partial outputs, partial LoRA sides and int32 tile counters of one device.

    One element each until a launch may pick a split-K config, then grown to what the largest
    one needs, so a forward allocates nothing for it afterwards, whichever config the
    autotuner chose. The counters are all zero between launches (the last program of a tile
    resets its counter). Shared by every launch on the device in stream order, like the dense
    path's decode buffers: not safe for split-K forwards running concurrently on two streams.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partials = torch.empty(1, dtype=torch.float32, device=device)
        self.sides = torch.empty(1, dtype=torch.float32, device=device)
        self.counters = torch.zeros(1, dtype=torch.int32, device=device)

    def reserve(self, partials: int, sides: int, counters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buffers of at least these numbers of elements (counters zeroed when allocated)."""
        if self.partials.numel() < partials:
            self.partials = torch.empty(partials, dtype=torch.float32, device=self.device)
        if self.sides.numel() < sides:
            self.sides = torch.empty(sides, dtype=torch.float32, device=self.device)
        if self.counters.numel() < counters:
            self.counters = torch.zeros(max(counters, 1024), dtype=torch.int32, device=self.device)
        return self.partials, self.sides, self.counters


_WORKSPACES: dict[torch.device, _SplitKWorkspace] = {}


def split_k_workspace(device: torch.device) -> _SplitKWorkspace:
    """The split-K workspace of `device` (created empty on first use)."""
    key = device_key(device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _SplitKWorkspace(key)
    return _WORKSPACES[key]


def clear_split_k_workspaces() -> None:
    """Free the split-K workspaces (the next split-K launch allocates again)."""
    _WORKSPACES.clear()


def _split_k_buffers(mode: int, qt: QuantizedTensor, act: torch.Tensor, m: int, out_size: int, r_pad: int):
    """(partials, partial sides, counters) of `act`'s device, large enough for every split-K
    config the autotuner may pick for this launch (the ones the prune keeps).

    Passed to every launch, split or not, so the kernel's pointer types never change with the
    config list (each change of signature would compile every config once more).
    """
    split = _split_k_tiles(mode, qt.format, qt.group_size, m_bucket(m), r_pad, act.element_size())
    workspace = split_k_workspace(act.device)
    if not split:
        return workspace.reserve(0, 0, 0)
    max_split = max(s for s, _, _ in split)
    out_tiles = max(triton.cdiv(out_size, block_out) for _, block_out, _ in split)
    m_tiles = max(triton.cdiv(m, block_m) for _, _, block_m in split)
    return workspace.reserve(max_split * m * out_size, out_tiles * max_split * m * r_pad, out_tiles * m_tiles)


#: _split_k_tiles' answers by launch key, each with the config list it was computed from.
_SPLIT_K_TILES: dict[tuple, tuple[list, tuple]] = {}


def _split_k_tiles(mode: int, fmt: str, group_size: int, bucket: int, r_pad: int, elem_bytes: int) -> tuple:
    """(SPLIT_K, BLOCK_OUT, BLOCK_M) of the split-K configs the autotuner may pick for this launch
    key. Cached, so the prune runs once per key instead of on every call; an entry holds its
    config list and is recomputed when the autotuner's list is replaced (tests and benchmarks
    force single configs that way)."""
    configs = autotuner(mode).configs
    key = (mode, fmt, group_size, bucket, r_pad, elem_bytes)
    hit = _SPLIT_K_TILES.get(key)
    if hit is not None and hit[0] is configs:
        return hit[1]
    kept = configs
    if len(configs) > 1:  # the autotuner prunes only when it has a choice
        group = group_size if fmt != "int8" else 1
        kept = valid_configs(configs, mode, group, FORMAT_IDS[fmt], bucket, r_pad, elem_bytes)
    tiles = tuple((c.kwargs["SPLIT_K"], c.kwargs["BLOCK_OUT"], c.kwargs["BLOCK_M"]) for c in kept
                  if c.kwargs["SPLIT_K"] > 1)  # fmt: skip
    _SPLIT_K_TILES[key] = (configs, tiles)
    return tiles


# ----------------------------------------------------------------------------- launchers
def _launch(
    mode: int,
    act: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    side: torch.Tensor | None,
) -> None:
    """Launch the fused kernel on checked operands (`check_operands`); out and side are row-major."""
    n, k = qt.shape
    m = act.shape[0]
    if m == 0:  # nothing to compute (and a grid dimension of 0 is not launchable)
        return
    if out.stride(1) != 1 or (side is not None and side.stride(1) != 1):
        raise ValueError("_launch: out and side must have unit stride along their last dimension")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads bias with unit stride
    has_lora = lora_a is not None
    r = lora_a.shape[0] if has_lora else 0
    if mode == MODE_FORWARD:  # down = A^T read as (K, r); up = B^T read as (r, N)
        down, up = lora_a, lora_b
        down_strides = (lora_a.stride(1), lora_a.stride(0)) if has_lora else (0, 0)
        up_strides = (lora_b.stride(1), lora_b.stride(0)) if has_lora else (0, 0)
        out_size = n
    else:  # down = B (N, r); up = A (r, K)
        down, up = lora_b, lora_a
        down_strides = (lora_b.stride(0), lora_b.stride(1)) if has_lora else (0, 0)
        up_strides = (lora_a.stride(0), lora_a.stride(1)) if has_lora else (0, 0)
        out_size = k
    placeholder = out
    r_pad = lora_r_pad(r)
    part, part_side, counters = _split_k_buffers(mode, qt, act, m, out_size, r_pad)
    grid = lambda meta: (triton.cdiv(out_size, meta["BLOCK_OUT"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])
    autotuner(mode)[grid](
        act,
        *weight_kernel_args(qt),
        down if has_lora else placeholder,
        up if has_lora else placeholder,
        bias if bias is not None else placeholder,
        out,
        side if side is not None else placeholder,
        part,
        part_side,
        counters,
        m,
        n,
        k,
        r,
        m_bucket(m),
        act.stride(0),
        act.stride(1),
        qt.data.stride(0),
        scales_row_stride(qt),
        *down_strides,
        *up_strides,
        out.stride(0),
        side.stride(0) if side is not None else 0,
        float(scaling),
        MODE=mode,
        **weight_meta(qt),
        HAS_LORA=has_lora,
        HAS_BIAS=bias is not None,
        STORE_SIDE=side is not None,
        R_PAD=r_pad,
    )


def qlora_forward_fused(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused small-M forward: (y (M, N) in x's dtype, x @ A^T (M, r) fp32 or None)."""
    check_operands(x, qt, lora_a, lora_b, bias, MODE_FORWARD, op="qlora_forward_fused")
    m = x.shape[0]
    y = torch.empty((m, qt.shape[0]), dtype=x.dtype, device=x.device)
    xa = torch.empty((m, lora_a.shape[0]), dtype=torch.float32, device=x.device) if lora_a is not None else None
    _launch(MODE_FORWARD, x, qt, lora_a, lora_b, scaling, bias, y, xa)
    return y, xa


def qlora_grad_input_fused(
    dy: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Fused small-M backward: dx = dy @ W + scaling * (dy @ B) @ A, (M, K) in dy's dtype."""
    check_operands(dy, qt, lora_a, lora_b, None, MODE_GRAD_INPUT, op="qlora_grad_input_fused")
    dx = torch.empty((dy.shape[0], qt.shape[1]), dtype=dy.dtype, device=dy.device)
    _launch(MODE_GRAD_INPUT, dy, qt, lora_a, lora_b, scaling, None, dx, None)
    return dx
