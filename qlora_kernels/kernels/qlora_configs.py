"""Autotune configs of the fused QLoRA matmul kernel and the invariants that prune them.

One module for what both the launcher (`qlora_matmul`) and the ahead-of-time compile report
(`benchmarks/kernel_report.py`) need: the candidate configs per mode, `config_is_valid` (the
pruning rule), the M bucket and rank padding used as autotune keys. It imports no kernel, so
the report and the GPU check can list configs without compiling anything.

Every GPU config is compiled for sm_80 and sm_90 under Triton 3.6 and the installed Triton by
`benchmarks/kernel_report.py` (tests/test_kernels_sass.py): no spills, tensor-core instructions,
128-bit packed-weight loads (but int8's backward, see `gpu_configs`). The figures quoted below
come from that report.
"""

from __future__ import annotations

import triton

from ._runtime import interpreter_enabled

#: Kernel modes (tl.constexpr MODE): y = x @ W^T (+ LoRA, bias), and dX = dY @ W (+ LoRA).
MODE_FORWARD = 0
MODE_GRAD_INPUT = 1

#: Autotune M buckets are powers of two capped here, so variable SFT lengths do not retune.
M_BUCKET_CAP = 64
#: LoRA rank is padded to a power of two >= this (the minimum tl.dot dimension).
MIN_R_PAD = 16
#: NF4 decodes in registers (weight_tile._nf4_level, a select tree); the forward then compiles
#: like int4 with no NF4 limit. The backward still spills at 64 decoded elements per thread
#: with BLOCK_M = 32 (M32-O64-R128-w4-s3: 8 B of stack on sm_80, Triton 3.9), not at 32.
NF4_MAX_ELEMS_PER_THREAD = {MODE_GRAD_INPUT: 32}
#: The packed weight tile must give each thread >= 16 bytes, or its loads cannot be 128-bit
#: (at 8 bytes per thread they are 64-bit: ld.global.v2 in the forward, 8-byte cp.async in
#: the pipelined backward), in every format and mode.
MIN_PACKED_BYTES_PER_THREAD = 16
#: Split-K (SPLIT_K > 1 configs) is offered to the forward for M <= this. The forward grid
#: is N / BLOCK_OUT programs (64 at N = 4096, BLOCK_OUT = 64) on 108-132 SMs, and a
#: single-stage CTA has one BLOCK_OUT x BLOCK_RED packed tile (2-4 KiB) in flight: far from
#: the ~20 KiB per SM that HBM latency x bandwidth asks. Split-K multiplies the programs by
#: SPLIT_K; its cost is the fp32 partial tiles, written and read once more through L2:
#: SPLIT_K * M * N * 4 bytes, 1/16 of an int4 weight's bytes per split at M = 16 (K = 4096),
#: 1/256 at M = 1, hence the limit 16.
SPLIT_K_MAX_M = 16
#: Shared memory budget used to prune configs: 99 KiB fits every sm_80+ card (sm_86/89 cap;
#: A100 has 163 KiB, H100 227 KiB), so a config never fails to launch for lack of it.
SMEM_BUDGET_BYTES = 99 * 1024


def make_config(block_m: int, block_out: int, block_red: int, warps: int, stages: int, split_k: int = 1):
    """A `triton.Config` of the kernel's tile sizes, warps, pipeline stages and K splits."""
    kwargs = {"BLOCK_M": block_m, "BLOCK_OUT": block_out, "BLOCK_RED": block_red, "SPLIT_K": split_k}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def config_label(cfg: triton.Config) -> str:
    """'M16-O64-R128-w4-s1' (plus '-k4' when it splits K): a config's name in reports."""
    kw = cfg.kwargs
    label = f"M{kw['BLOCK_M']}-O{kw['BLOCK_OUT']}-R{kw['BLOCK_RED']}-w{cfg.num_warps}-s{cfg.num_stages}"
    return label + (f"-k{kw['SPLIT_K']}" if kw["SPLIT_K"] > 1 else "")


#: The one config used under TRITON_INTERPRET=1: small (interpreted tiles are slow) and valid
#: for every format and group size (32 divides every supported group size).
INTERPRETER_CONFIG = make_config(16, 32, 32, 4, 1)
#: A split-K config for interpreter tests (not used unless a test installs it).
INTERPRETER_SPLIT_K_CONFIG = make_config(16, 32, 32, 4, 1, split_k=3)


def gpu_configs(mode: int) -> list[triton.Config]:
    """Candidate GPU configs for `mode`, before pruning (also what kernel_report compiles).

    Forward (small M, bandwidth bound; W is the MMA's A operand, "swap AB"): one stage. With
    num_stages > 1 Triton pipelines the packed tile through shared memory with cp.async, and
    the swizzle it picks for the nibble-unpacking consumer narrows those copies to 4-8 bytes;
    single-stage configs load it with 128-bit LDG instead. Latency is then hidden by several
    CTAs per SM (<= 168 registers) and, at M <= SPLIT_K_MAX_M, by split-K.
    Backward (dY @ W, W as the B operand): its pipelined copies of 4-bit tiles are 128-bit once
    a thread's share of the packed tile is 16 bytes, so it keeps stages. int8 tiles are copied
    64 bits at a time except with BLOCK_M = 64 on sm_90: Triton gives the loaded int8 tile the
    layout of the tensor-core operand it feeds (8 bytes per thread), which 4-bit tiles escape
    through their nibble unpacking. The weight tile's K extent
    (BLOCK_RED forward, BLOCK_OUT backward) is bounded by the group size.
    The autotuner picks among them per bucketed M; benchmarks/gpu_check.py records its choices.
    """
    if mode == MODE_FORWARD:
        return [
            make_config(16, 32, 128, 4, 1),
            make_config(16, 64, 128, 4, 1),
            make_config(16, 64, 64, 4, 1),
            make_config(16, 128, 64, 4, 1),
            make_config(16, 128, 64, 8, 1),
            make_config(64, 64, 64, 4, 1),
            make_config(16, 128, 32, 4, 1),  # group size 32
            # split-K, M <= SPLIT_K_MAX_M only (4096 x 4096: 256-512 programs for 132 SMs)
            make_config(16, 64, 128, 4, 1, split_k=4),
            make_config(16, 64, 64, 4, 1, split_k=4),  # NF4 g64
            make_config(16, 32, 128, 4, 1, split_k=8),
            make_config(16, 128, 32, 4, 1, split_k=4),  # group size 32
            # more programs in flight at M = 1 (H200, 4096 x 4096: 4-split NF4 reached 6% of HBM)
            make_config(16, 64, 128, 4, 1, split_k=8),
            make_config(16, 64, 64, 4, 1, split_k=8),
            make_config(16, 64, 64, 4, 1, split_k=16),
            # BLOCK_M = 1: the GEMV (no tensor cores) for decoding, whole K or split
            make_config(1, 64, 64, 4, 1),
            make_config(1, 64, 64, 4, 1, split_k=8),
            make_config(1, 64, 128, 4, 1, split_k=8),
            make_config(1, 128, 64, 8, 1, split_k=8),
        ]
    # Dropped for spills under Triton 3.6 (kernel_report): M16-O128-R64-w4-s3 (int4: 64 B sm_80,
    # 72 B sm_90; w8: 56/88 B), M64-O128-R64-w8-s3 (int4 sm_80: 80 B; s2: 56 B); M32-O64-R128
    # moved from 4 to 8 warps (int8 sm_90: 16 B under 3.6, 72 B under 3.9 with 4 warps).
    # M64-O64-R64-w4-s3 was dropped after its first GPU run (H200, Triton 3.6): int4 gave a wrong,
    # run-to-run varying dX (relative error 5.4) and NF4 an illegal memory access; it was the only
    # backward config whose BLOCK_M = 64 makes dY @ W a wgmma, pipelined over 3 stages. M 33..64
    # takes the M32 config (two M tiles; the second reads the weight tile from L2).
    return [
        make_config(16, 32, 128, 4, 4),  # group size 32
        make_config(16, 64, 64, 4, 4),
        make_config(32, 64, 128, 8, 3),
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
    wider than the bucket (16 = tl.dot's minimum; BLOCK_M = 1 is the forward's GEMV, at M = 1
    only); split-K only in the small-M forward; 16 packed bytes per thread; NF4's register
    budget in the backward; shared memory within SMEM_BUDGET_BYTES."""
    kw = cfg.kwargs
    weight_k = kw["BLOCK_RED"] if mode == MODE_FORWARD else kw["BLOCK_OUT"]
    if fmt_id != 0 and (weight_k > group or group % weight_k):
        return False
    if kw["BLOCK_M"] > max(16, m_bucket):
        return False
    if kw["BLOCK_M"] < 16 and (mode != MODE_FORWARD or m_bucket > kw["BLOCK_M"]):  # the GEMV: M = 1 only
        return False
    if kw["SPLIT_K"] > 1 and (mode != MODE_FORWARD or m_bucket > SPLIT_K_MAX_M):
        return False
    elems_per_thread = kw["BLOCK_OUT"] * kw["BLOCK_RED"] // (32 * cfg.num_warps)
    if fmt_id == 2 and elems_per_thread > NF4_MAX_ELEMS_PER_THREAD.get(mode, elems_per_thread):
        return False
    packed_bytes = elems_per_thread if fmt_id == 0 else elems_per_thread // 2
    if packed_bytes < MIN_PACKED_BYTES_PER_THREAD:
        return False
    smem = smem_estimate(kw["BLOCK_M"], kw["BLOCK_OUT"], kw["BLOCK_RED"], cfg.num_stages, r_pad, elem_bytes)
    return smem <= SMEM_BUDGET_BYTES


def valid_configs(
    configs: list[triton.Config], mode: int, group: int, fmt_id: int, m_bucket: int, r_pad: int, elem_bytes: int = 2
) -> list[triton.Config]:
    """The configs of `configs` that satisfy `config_is_valid` for this launch."""
    return [c for c in configs if config_is_valid(c, mode, group, fmt_id, m_bucket, r_pad, elem_bytes)]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early_config_prune hook: keep the configs valid for this launch."""
    args = {**named_args, **kwargs}
    keep = valid_configs(
        configs,
        args["MODE"],
        args["GROUP"],
        args["FORMAT"],
        args["M_BUCKET"],
        args["R_PAD"],
        args["act_ptr"].element_size(),
    )
    if not keep:
        raise ValueError(
            f"no kernel config fits group size {args['GROUP']} with LoRA rank padded to {args['R_PAD']}; "
            "use a smaller rank or the dense path"
        )
    return keep


def _next_power_of_2(n: int) -> int:
    """Smallest power of two >= n >= 1 (plain Python: triton.next_power_of_2 is a constexpr
    function whose wrapper costs microseconds on every launch)."""
    return 1 << (n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two, capped at M_BUCKET_CAP."""
    return min(_next_power_of_2(max(m, 1)), M_BUCKET_CAP)


def lora_r_pad(r: int) -> int:
    """LoRA rank padded to a power of two >= MIN_R_PAD (tl.dot's minimum dimension)."""
    return max(MIN_R_PAD, _next_power_of_2(max(r, 1)))
