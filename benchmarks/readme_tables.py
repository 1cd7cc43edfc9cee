"""Paste the latest committed tables of results/cpu/ into benchmarks/README.md (below its marker).

python -m benchmarks.readme_tables [--results benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import markdown_table
from benchmarks.run_layers import LAYER_COLUMNS

README = Path(__file__).parent / "README.md"
MARKER = "<!-- tables below are pasted from results/cpu/*.md -->"


def _md(path: Path) -> str:
    """A result table without its leading HTML comment line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("<!--")).strip()


def _meta_line(path: Path) -> str:
    meta = json.loads(path.read_text())["meta"]
    return (
        f"_{meta['date']}, commit {meta['git_commit']}, torch {meta['versions']['torch']}, "
        f"bitsandbytes {meta['versions']['bitsandbytes']}, peft {meta['versions']['peft']}, "
        f"trl {meta['versions'].get('trl')}, load average {meta.get('load_average')}_"
    )


def render(results: Path) -> str:
    """The README's results section from the files in `results`."""
    parts = []
    if (results / "summary.json").is_file():
        summary = json.loads((results / "summary.json").read_text())
        secs = summary.get("suite_seconds", {})
        parts += [
            "### Targets (`summary.json`)",
            "",
            _meta_line(results / "summary.json")
            + (f"; `bench --suite cpu` took {secs['total_s'] / 60:.1f} min" if "total_s" in secs else ""),
            "",
            _md(results / "summary.md"),
            "",
        ]
    if (results / "e2e.md").is_file():
        parts += ["### SFT step: our trainer vs TRL + PEFT (+ bitsandbytes)", "", _md(results / "e2e.md"), ""]
        parts += ["![e2e](results/cpu/e2e.png)", ""]
    if (results / "layers.json").is_file():
        data = json.loads((results / "layers.json").read_text())
        peaks = data.get("peaks", {})
        nf4 = [r for r in data["rows"] if r["fmt"] == "nf4"]
        parts += [
            "### Layer: NF4 LoRA layer, fastest of interleaved rounds (all formats: results/cpu/layers.md)",
            "",
            f"Measured peaks in the same run: copy {peaks.get('copy_gb_s', float('nan')):.1f} GB/s, fp32 matmul "
            f"{peaks.get('matmul_fp32_gflop_s', float('nan')):.0f} GFLOP/s, bf16 matmul "
            f"{peaks.get('matmul_bf16_gflop_s', float('nan')):.0f} GFLOP/s.",
            "",
            markdown_table(nf4, LAYER_COLUMNS),
            "",
            "![layers](results/cpu/layers_time_vs_m.png)",
            "",
        ]
    if (results / "memory.md").is_file():
        parts += ["### Memory", "", _md(results / "memory.md"), "", "![memory](results/cpu/memory_bars.png)", ""]
    if (results / "methods.md").is_file():
        text = (results / "methods.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1].split("<!-- notes", 1)[0]
        parts += [
            "### The lecture's methods (results/cpu/methods.md has the discussion)",
            "",
            "\n".join(line for line in body.strip().splitlines() if not line.startswith("<!--")),
            "",
            "![accuracy vs trainable parameters](results/cpu/accuracy_vs_params.png)",
            "",
        ]
    if (results / "dequant_cpu.md").is_file():
        parts += [
            "### Dequantization",
            "",
            "Native C++ decode vs the PyTorch reference vs bitsandbytes: results/cpu/dequant_cpu.md (full run); "
            "the CPU suite reruns the SmolLM2 shape into results/cpu/dequant_quick.md.",
            "",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "cpu")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    head = text.split(MARKER, 1)[0]
    README.write_text(head + MARKER + "\n\n" + render(args.results) + "\n", encoding="utf-8")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
