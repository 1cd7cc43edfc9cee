"""QLoRA matmul on packed weights: fused Triton kernel (small M), buffer + cuBLAS path (large M).

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
bit for bit and the LoRA up-projection and bias are added exactly once (see SPLIT_K_MAX_M).
Codegen of every config is checked without a GPU by benchmarks/kernel_report.py (registers,
spills, 128-bit packed loads); no GPU timings exist yet, so the configs are not ranked here.

Large M is compute bound: the packed weight is decoded once into a reused dense buffer
(`dequantize_triton`) and cuBLAS does the matmul; LoRA is applied rank first with addmm.
`TritonBackend` picks the path by M (`FUSED_MAX_M`, `FUSED_BWD_MAX_M`).

The launchers are also registered as torch.library custom ops ("qlora_kernels::qlora_forward",
"qlora_kernels::qlora_grad_input") with fake implementations, so torch.compile treats them as
opaque graph nodes instead of breaking the graph on the Triton launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import QuantizedTensor
from ._runtime import check_launchable, interpreter_enabled
from .dequant import dequantize_triton, scales_row_stride, weight_kernel_args, weight_meta
from .weight_tile import load_weight_tile

# ------------------------------------------------------------------------------ dispatch
#: Largest M (rows of x) that takes the fused forward kernel; above it, dequantize + cuBLAS.
#: Not measured on a GPU yet. Measure with benchmarks/gpu_check.py on the target card: time both
#: paths (`force_path`) for M in 1..1024 at 4096x4096 and 4096x14336 and set this to the largest
#: M where the fused kernel is still faster. 64, a starting guess, is where the fused forward
#: stops being bound by reading the weight (docs/architecture.md, "One qlora_linear call").
FUSED_MAX_M = 64
#: Same, for the backward dX kernel (dY (M, N) @ W). Same measurement, fwd+bwd timings.
FUSED_BWD_MAX_M = 64
#: Autotune M buckets are powers of two capped here, so variable SFT lengths do not retune.
M_BUCKET_CAP = 64

#: Kernel modes (tl.constexpr MODE).
MODE_FORWARD = 0
MODE_GRAD_INPUT = 1

#: LoRA rank is padded to a power of two >= this (the minimum tl.dot dimension).
MIN_R_PAD = 16
#: NF4 decodes in registers (weight_tile._nf4_level, a select tree); with it the forward
#: compiles like int4 (kernel_report, triton 3.9, nf4/g64: no spills up to 64 decoded
#: elements per thread, 128-168 regs on sm_80, 128-174 on sm_90), so the forward has no NF4
#: limit. The backward still spills at 64 elements per thread with BLOCK_M=32 (M32-O64-R128-w4-s3:
#: 8 B stack on sm_80), not at 32, so its NF4 configs are pruned above that.
NF4_MAX_ELEMS_PER_THREAD = {MODE_GRAD_INPUT: 32}
#: The forward's packed tile must give each thread >= 16 bytes, or its loads cannot be
#: 128-bit (every format: at 8 bytes per thread they are 64-bit, kernel_report).
MIN_PACKED_BYTES_PER_THREAD = 16
#: Split-K (SPLIT_K > 1 configs) is offered to the forward for M <= this. The forward grid
#: is N / BLOCK_OUT programs (64 at N = 4096, BLOCK_OUT = 64) on 108-132 SMs, one 4-warp
#: CTA per SM at most, and a single-stage CTA has one BLOCK_OUT x BLOCK_RED packed tile
#: (2-4 KiB) in flight: far from the ~20 KiB per SM that HBM latency x bandwidth asks.
#: Split-K multiplies the programs by SPLIT_K; its cost is the fp32 partial tiles, written
#: and read once more through L2: SPLIT_K * M * N * 4 bytes, 1/16 of an int4 weight's bytes
#: per split at M = 16 (K = 4096), 1/256 at M = 1, hence the limit 16. Reduction scheme:
#: the last program of a tile (atomic counter) sums the partials in split order, so results
#: are bitwise reproducible, unlike fp32 atomic adds into the output (order-dependent), and
#: it needs one launch, no zero-filled buffer and no cast pass. Not timed on a GPU yet.
SPLIT_K_MAX_M = 16
#: Shared memory budget used to prune configs: 99 KiB fits every sm_80+ card (sm_86/89 cap;
#: A100 has 163 KiB, H100 227 KiB), so a config never fails to launch for lack of it.
SMEM_BUDGET_BYTES = 99 * 1024


# ---------------------------------------------------------------------------- the kernel
@triton.jit
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

    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_OUT, BLOCK_M), dtype=tl.float32)  # forward accumulates out^T (swap AB)
    side = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
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
            acc_t = tl.dot(w.to(act.dtype), tl.trans(act), acc_t, input_precision="ieee")
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
            side = tl.dot(act, down.to(tl.float32).to(act.dtype), side, input_precision="ieee")

    if MODE == 0:
        acc = tl.trans(acc_t)
    if SPLIT_K == 1:
        _epilogue(
            acc, side, up_ptr, bias_ptr, out_ptr, side_ptr, offs_m, offs_out, offs_r, mask_m, mask_out, pid_out, R,
            stride_up_r, stride_up_out, stride_out_m, stride_side_m, scaling, HAS_LORA, HAS_BIAS, STORE_SIDE,
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
                STORE_SIDE,
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
):
    """out = acc + scaling * side @ up + bias on one (BLOCK_M, BLOCK_OUT) tile; side stored by pid_out 0."""
    if HAS_LORA:
        # Rank-first up-projection in fp32 (R_PAD x BLOCK_OUT per tile: negligible work).
        up_offs = offs_r[:, None] * stride_up_r + offs_out.to(tl.int64)[None, :] * stride_up_out
        up = tl.load(up_ptr + up_offs, mask=(offs_r < R)[:, None] & mask_out[None, :], other=0.0).to(tl.float32)
        acc += scaling * tl.dot(side, up, input_precision="ieee")
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
def _config(block_m: int, block_out: int, block_red: int, warps: int, stages: int, split_k: int = 1) -> triton.Config:
    kwargs = {"BLOCK_M": block_m, "BLOCK_OUT": block_out, "BLOCK_RED": block_red, "SPLIT_K": split_k}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


#: The one config used under TRITON_INTERPRET=1: small (interpreted tiles are slow) and valid
#: for every format and group size (32 divides every group size in GROUP_SIZES).
INTERPRETER_CONFIG = _config(16, 32, 32, 4, 1)
#: A split-K config for interpreter tests (not used unless a test installs it).
INTERPRETER_SPLIT_K_CONFIG = _config(16, 32, 32, 4, 1, split_k=3)


def gpu_configs(mode: int) -> list[triton.Config]:
    """Candidate GPU configs for `mode`, before pruning (also what kernel_report compiles).

    Forward (small M, bandwidth bound; W is the MMA's A operand, "swap AB"): one stage. With
    num_stages > 1 Triton pipelines the packed tile through shared memory with cp.async, and
    the swizzle it picks for the nibble-unpacking consumer narrows those copies to 4-8 bytes;
    single-stage configs load it with LDG.E.128 instead (benchmarks/kernel_report.py, sm_80
    and sm_90, triton 3.9). Latency is then hidden by several CTAs per SM (<= 168 registers).
    Backward (dY @ W, W as the B operand): its pipelined copies are 128-bit, so it keeps stages.
    The weight tile's K extent (BLOCK_RED forward, BLOCK_OUT backward) is bounded by the group.
    Not timed on a GPU yet: the autotuner picks among them per bucketed M.
    """
    if mode == MODE_FORWARD:
        return [
            _config(16, 32, 128, 4, 1),
            _config(16, 64, 128, 4, 1),
            _config(16, 64, 64, 4, 1),
            _config(16, 128, 64, 4, 1),
            _config(16, 128, 64, 8, 1),
            _config(64, 64, 64, 4, 1),
            _config(16, 128, 32, 4, 1),  # group size 32
            # split-K, M <= SPLIT_K_MAX_M only (4096 x 4096: 256-512 programs for 132 SMs)
            _config(16, 64, 128, 4, 1, split_k=4),
            _config(16, 64, 64, 4, 1, split_k=4),  # NF4 g64
            _config(16, 32, 128, 4, 1, split_k=8),
            _config(16, 128, 32, 4, 1, split_k=4),  # group size 32
        ]
    return [
        _config(16, 32, 64, 4, 4),  # group size 32
        _config(16, 64, 64, 4, 4),
        _config(16, 128, 64, 4, 3),
        _config(32, 64, 128, 4, 3),
        _config(64, 128, 64, 8, 3),
    ]


def kernel_configs(mode: int) -> list[triton.Config]:
    """The configs the autotuner sees: the interpreter's single one, or the GPU list."""
    return [INTERPRETER_CONFIG] if interpreter_enabled() else gpu_configs(mode)


def smem_estimate(block_m: int, block_out: int, block_red: int, stages: int, r_pad: int, elem_bytes: int) -> int:
    """Rough shared memory bytes of a config: pipelined activation/down tiles + the decoded W tile."""
    per_stage = (block_m * block_red + block_red * r_pad) * elem_bytes
    return stages * per_stage + block_out * block_red * elem_bytes + r_pad * block_out * 4


def config_is_valid(
    cfg: triton.Config, mode: int, group: int, fmt_id: int, m_bucket: int, r_pad: int, elem_bytes: int = 2
) -> bool:
    """Invariants: the weight tile's K extent divides the group (4-bit formats); M tile not
    wider than the bucket (16 = tl.dot's minimum); 16 packed bytes per thread in the forward;
    NF4's register budget in the backward; shared memory within SMEM_BUDGET_BYTES."""
    kw = cfg.kwargs
    weight_k = kw["BLOCK_RED"] if mode == MODE_FORWARD else kw["BLOCK_OUT"]
    if fmt_id != 0 and (weight_k > group or group % weight_k):
        return False
    if kw["BLOCK_M"] > max(16, m_bucket):
        return False
    if kw["SPLIT_K"] > 1 and (mode != MODE_FORWARD or m_bucket > SPLIT_K_MAX_M):
        return False
    elems_per_thread = kw["BLOCK_OUT"] * kw["BLOCK_RED"] // (32 * cfg.num_warps)
    if fmt_id == 2 and elems_per_thread > NF4_MAX_ELEMS_PER_THREAD.get(mode, elems_per_thread):
        return False
    packed_bytes = elems_per_thread if fmt_id == 0 else elems_per_thread // 2
    if mode == MODE_FORWARD and packed_bytes < MIN_PACKED_BYTES_PER_THREAD:
        return False
    smem = smem_estimate(kw["BLOCK_M"], kw["BLOCK_OUT"], kw["BLOCK_RED"], cfg.num_stages, r_pad, elem_bytes)
    return smem <= SMEM_BUDGET_BYTES


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """early_config_prune hook: keep the configs that satisfy `config_is_valid`."""
    args = {**named_args, **kwargs}
    keep = [
        c
        for c in configs
        if config_is_valid(
            c,
            args["MODE"],
            args["GROUP"],
            args["FORMAT"],
            args["M_BUCKET"],
            args["R_PAD"],
            args["act_ptr"].element_size(),
        )
    ]
    if not keep:
        raise ValueError(f"no kernel config satisfies the invariants for group size {args['GROUP']}")
    return keep


def _tuned(mode: int):
    return triton.autotune(
        configs=kernel_configs(mode),
        key=["M_BUCKET", "N", "K", "R_PAD", "FORMAT", "GROUP", "HAS_LORA", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune},
    )(_qlora_matmul_kernel)


# One autotuner per mode, so forward and backward keep separate tuning caches.
_forward_tuned = _tuned(MODE_FORWARD)
_grad_input_tuned = _tuned(MODE_GRAD_INPUT)


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped at M_BUCKET_CAP."""
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_CAP)


def lora_r_pad(r: int) -> int:
    """LoRA rank padded to a power of two >= MIN_R_PAD (tl.dot's minimum dimension)."""
    return max(MIN_R_PAD, triton.next_power_of_2(max(r, 1)))


# ----------------------------------------------------------------------------- launchers
def _check_fused_args(act: torch.Tensor, qt: QuantizedTensor, lora_a, lora_b, op: str) -> None:
    check_launchable(act, qt.data, lora_a, lora_b, op=op)
    if act.dim() != 2:
        raise ValueError(f"{op}: the activation must be 2-D (M, features), got {tuple(act.shape)}")
    if act.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: the activation must be bf16, fp16 or fp32, got {act.dtype}")


#: Per-device split-K tile counters (int32, all zero between launches: the last program of
#: each tile resets its counter). Shared by every launch on the device, so, like the decode
#: buffers below, not safe for two streams running split-K forwards concurrently.
_SPLIT_K_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_k_counters(count: int, device: torch.device) -> torch.Tensor:
    """At least `count` zeroed int32 tile counters on `device` (allocated once, grown when needed)."""
    key = torch.device(device)
    counters = _SPLIT_K_COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=key)
        _SPLIT_K_COUNTERS[key] = counters
    return counters


def _split_k_workspace(tuned, mode: int, qt: QuantizedTensor, act: torch.Tensor, m: int, out_size: int, r_pad: int):
    """(partials, partial sides, counters) big enough for every config the autotuner may pick
    for this launch (the ones `_prune` keeps), or (None, None, None) when none splits K."""
    configs = tuned.configs
    if len(configs) > 1:  # the autotuner prunes only when it has a choice
        meta = weight_meta(qt)
        configs = [
            c
            for c in configs
            if config_is_valid(c, mode, meta["GROUP"], meta["FORMAT"], m_bucket(m), r_pad, act.element_size())
        ]
    split = [c.kwargs for c in configs if c.kwargs["SPLIT_K"] > 1]
    if not split:
        return None, None, None
    max_split = max(kw["SPLIT_K"] for kw in split)
    out_tiles = max(triton.cdiv(out_size, kw["BLOCK_OUT"]) for kw in split)
    m_tiles = max(triton.cdiv(m, kw["BLOCK_M"]) for kw in split)
    part = torch.empty((max_split, m, out_size), dtype=torch.float32, device=act.device)
    part_side = torch.empty((out_tiles, max_split, m, r_pad), dtype=torch.float32, device=act.device)
    return part, part_side, split_k_counters(out_tiles * m_tiles, act.device)


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
    """Launch the fused kernel; strides of every input are passed (non-contiguous is fine)."""
    n, k = qt.shape
    m = act.shape[0]
    has_lora = lora_a is not None
    r = lora_a.shape[0] if has_lora else 0
    if mode == MODE_FORWARD:  # down = A^T read as (K, r); up = B^T read as (r, N)
        down, up = lora_a, lora_b
        down_strides = (lora_a.stride(1), lora_a.stride(0)) if has_lora else (0, 0)
        up_strides = (lora_b.stride(1), lora_b.stride(0)) if has_lora else (0, 0)
        out_size, tuned = n, _forward_tuned
    else:  # down = B (N, r); up = A (r, K)
        down, up = lora_b, lora_a
        down_strides = (lora_b.stride(0), lora_b.stride(1)) if has_lora else (0, 0)
        up_strides = (lora_a.stride(0), lora_a.stride(1)) if has_lora else (0, 0)
        out_size, tuned = k, _grad_input_tuned
    placeholder = out
    r_pad = lora_r_pad(r)
    part, part_side, counters = _split_k_workspace(tuned, mode, qt, act, m, out_size, r_pad)
    grid = lambda meta: (triton.cdiv(out_size, meta["BLOCK_OUT"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])
    tuned[grid](
        act,
        *weight_kernel_args(qt),
        down if has_lora else placeholder,
        up if has_lora else placeholder,
        bias if bias is not None else placeholder,
        out,
        side if side is not None else placeholder,
        part if part is not None else placeholder,
        part_side if part_side is not None else placeholder,
        counters if counters is not None else placeholder,
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
    _check_fused_args(x, qt, lora_a, lora_b, op="qlora_forward_fused")
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
    _check_fused_args(dy, qt, lora_a, lora_b, op="qlora_grad_input_fused")
    dx = torch.empty((dy.shape[0], qt.shape[1]), dtype=dy.dtype, device=dy.device)
    _launch(MODE_GRAD_INPUT, dy, qt, lora_a, lora_b, scaling, None, dx, None)
    return dx


# ------------------------------------------------------------------- large-M (buffer) path
#: Dense decode buffers for the large-M path, keyed on (shape, dtype, device). One buffer is
#: reused by every layer of that shape: the decode and the matmul that reads it run in stream
#: order, and nothing keeps a reference past the matmul (autograd saves x and x @ A^T, never
#: the buffer). Not safe if two streams run layers of one shape concurrently.
_WEIGHT_BUFFERS: dict[tuple[tuple[int, int], torch.dtype, torch.device], torch.Tensor] = {}


def weight_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The reused (N, K) decode buffer for this shape/dtype/device (allocated on first use)."""
    key = (tuple(shape), dtype, torch.device(device))
    buf = _WEIGHT_BUFFERS.get(key)
    if buf is None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        _WEIGHT_BUFFERS[key] = buf
    return buf


def clear_weight_buffers() -> None:
    """Free the decode buffers (e.g. after training, or between models of different shapes)."""
    _WEIGHT_BUFFERS.clear()


def _decoded(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_triton(qt, dtype, out=weight_buffer(qt.shape, dtype, qt.device))


def qlora_forward_dense(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Large-M forward: decode W into the reused buffer, cuBLAS matmul, LoRA rank first."""
    dtype = x.dtype
    w = _decoded(qt, dtype)
    y = torch.addmm(bias.to(dtype), x, w.t()) if bias is not None else torch.mm(x, w.t())
    xa = None
    if lora_a is not None:
        xa = torch.mm(x, lora_a.to(dtype).t()).float()
        y.addmm_(xa.to(dtype), lora_b.to(dtype).t(), alpha=scaling)
    return y, xa


def qlora_grad_input_dense(
    dy: torch.Tensor, qt: QuantizedTensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Large-M backward: decode W again into the reused buffer (never kept from the forward)."""
    dtype = dy.dtype
    dx = torch.mm(dy, _decoded(qt, dtype))
    if lora_a is not None:
        dx.addmm_(torch.mm(dy, lora_b.to(dtype)), lora_a.to(dtype), alpha=scaling)
    return dx


# ---------------------------------------------------------------------- dispatch by M
def qlora_forward_triton(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward on (M, K) x: fused kernel for M <= FUSED_MAX_M, else the buffer path."""
    if x.shape[0] <= FUSED_MAX_M:
        return qlora_forward_fused(x, qt, lora_a, lora_b, scaling, bias)
    return qlora_forward_dense(x, qt, lora_a, lora_b, scaling, bias)


def qlora_grad_input_triton(
    dy: torch.Tensor, qt: QuantizedTensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """dX on (M, N) dy: fused kernel for M <= FUSED_BWD_MAX_M, else the buffer path."""
    if dy.shape[0] <= FUSED_BWD_MAX_M:
        return qlora_grad_input_fused(dy, qt, lora_a, lora_b, scaling)
    return qlora_grad_input_dense(dy, qt, lora_a, lora_b, scaling)


# ------------------------------------------------------------- torch.library custom ops
# The launchers take a QuantizedTensor, which torch.library cannot type; the ops take its
# fields and rebuild it (a frozen dataclass: free). Fake implementations give torch.compile
# the output shapes, so the Triton launch is one opaque node instead of a graph break.
OP_NAMESPACE = "qlora_kernels"
_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric) -> QuantizedTensor:
    return QuantizedTensor(
        format=fmt,
        shape=(n, k),
        group_size=group_size,
        data=data,
        scales=scales,
        mins=mins,
        absmax_scales=absmax_scales,
        absmax_offset=absmax_offset,
        symmetric=symmetric,
    )


def _forward_impl(
    x: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    absmax_scales: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    group_size: int,
    symmetric: bool,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa); without LoRA xa is an empty (M, 0) tensor (custom ops cannot return None)."""
    qt = _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric)
    y, xa = qlora_forward_triton(x, qt, lora_a, lora_b, scaling, bias)
    if xa is None:
        xa = x.new_empty((x.shape[0], 0), dtype=torch.float32)
    return y, xa


def _forward_fake(x, data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric, lora_a,
                  lora_b, scaling, bias):  # fmt: skip
    r = lora_a.shape[0] if lora_a is not None else 0
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r), dtype=torch.float32)


def _grad_input_impl(
    dy: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    absmax_scales: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    group_size: int,
    symmetric: bool,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    qt = _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric)
    return qlora_grad_input_triton(dy, qt, lora_a, lora_b, scaling)


def _grad_input_fake(dy, data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric, lora_a,
                     lora_b, scaling):  # fmt: skip
    return dy.new_empty((dy.shape[0], k))


if _HAS_CUSTOM_OP:
    qlora_forward_op = torch.library.custom_op(f"{OP_NAMESPACE}::qlora_forward", mutates_args=())(_forward_impl)
    torch.library.register_fake(f"{OP_NAMESPACE}::qlora_forward")(_forward_fake)
    qlora_grad_input_op = torch.library.custom_op(f"{OP_NAMESPACE}::qlora_grad_input", mutates_args=())(
        _grad_input_impl
    )
    torch.library.register_fake(f"{OP_NAMESPACE}::qlora_grad_input")(_grad_input_fake)
else:  # torch without torch.library.custom_op: call the launchers directly (eager only)
    qlora_forward_op = _forward_impl
    qlora_grad_input_op = _grad_input_impl


def _weight_fields(qt: QuantizedTensor) -> tuple:
    n, k = qt.shape
    return (qt.data, qt.scales, qt.mins, qt.absmax_scales, qt.absmax_offset, qt.format, n, k, qt.group_size,
            qt.symmetric)  # fmt: skip


# --------------------------------------------------------------------------- the backend
class TritonBackend:
    """`QLoRABackend` on the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""

    def forward(
        self,
        x: torch.Tensor,
        qt: QuantizedTensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, xa = qlora_forward_op(x, *_weight_fields(qt), lora_a, lora_b, float(scaling), bias)
        return y, (xa if lora_a is not None else None)

    def grad_input(
        self,
        dy: torch.Tensor,
        qt: QuantizedTensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        return qlora_grad_input_op(dy, *_weight_fields(qt), lora_a, lora_b, float(scaling))
