"""One fused small-M forward per format, bracketed for Nsight Compute (ncu) on the GPU machine.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python3 -m benchmarks.gpu_ncu --m 1 --shape 4096x4096

Each format's layer (Llama-3-8B q_proj shape by default, LoRA rank 16, bf16 activations) is
called until the autotuner has picked its config, then once more between
cudaProfilerStart/Stop, so ncu profiles exactly the tuned kernel (and the split-K or LoRA
launches of that one call) and nothing of the tuning. The chosen configs are printed.
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1, help="rows of x (default 1: decoding)")
    parser.add_argument("--shape", default="4096x4096", help="N x K of the weight (default 4096x4096)")
    parser.add_argument("--formats", default="nf4,int4,int8")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import qlora_kernels as qk
    from qlora_kernels.kernels.qlora_configs import MODE_FORWARD, config_label
    from qlora_kernels.kernels.qlora_matmul import autotuner
    from qlora_kernels.ops import qlora_linear

    n, k = (int(v) for v in args.shape.lower().split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    a = (torch.randn(16, k, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
    b = (torch.randn(n, 16, device="cuda", generator=g) * 0.01).to(torch.bfloat16)
    for fmt in args.formats.split(","):
        qt = qk.quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02, fmt)
        for _ in range(3):
            qlora_linear(x, qt, a, b, 2.0, backend="triton")
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        qlora_linear(x, qt, a, b, 2.0, backend="triton")
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        chosen = {str(key): config_label(cfg) for key, cfg in autotuner(MODE_FORWARD).cache.items()}
        print(f"{fmt} M={args.m} {n}x{k}: tuned configs {chosen}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
