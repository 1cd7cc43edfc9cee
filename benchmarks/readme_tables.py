"""Paste the latest committed tables of every results/<machine>/ folder into benchmarks/README.md
(below its marker), one section per machine.

python -m benchmarks.readme_tables [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS_DIR, markdown_table
from benchmarks.run_layers import LAYER_COLUMNS

README = Path(__file__).parent / "README.md"
EXTRA_TABLES = [
    ("small_m", "Small M: decoding-sized forward and greedy decoding"),
    ("ecosystem", "transformers quantizer: loading, and TRL + PEFT on our layers"),
    ("distributed", "Two ranks (DDP, FSDP2) against one"),
]
MARKER = "<!-- tables below are pasted from results/<machine>/*.md by python -m benchmarks.readme_tables -->"


def _md(path: Path) -> str:
    """A result table without its leading HTML comment line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(_nested(line) for line in lines if not line.startswith(("<!--", "# "))).strip()


def _nested(line: str) -> str:
    """A pasted file's "## " heading, two levels down: it sits under a machine's "##" and a table's "###"."""
    return "##" + line if line.startswith("## ") else line


def _meta_line(path: Path) -> str:
    meta = json.loads(path.read_text())["meta"]
    return (
        f"_{meta['date']}, commit {meta['git_commit']}, torch {meta['versions']['torch']}, "
        f"bitsandbytes {meta['versions']['bitsandbytes']}, peft {meta['versions']['peft']}, "
        f"trl {meta['versions'].get('trl')}, load average {meta.get('load_average')}_"
    )


def render(results: Path) -> str:
    """The README's results section from the files in `results` (one machine's folder)."""
    parts = []
    rel = f"results/{results.name}"
    if (results / "gpu_check.md").is_file():  # a GPU check: its header and target table
        report = (results / "gpu_check.md").read_text(encoding="utf-8")
        head, targets = report.split("## Parts", 1)[0].split("## Targets", 1)
        parts += [f"### GPU check ({rel}/gpu_check.md)", "", head.splitlines()[2].strip(), "", targets.strip(), ""]
    if (results / "summary.json").is_file():
        summary = json.loads((results / "summary.json").read_text())
        secs = summary.get("suite_seconds", {})
        parts += [
            "### Targets (`summary.json`)",
            "",
            _meta_line(results / "summary.json")
            + (f"; the CPU suite took {secs['total_s'] / 60:.1f} min" if "total_s" in secs else ""),
            "",
            _md(results / "summary.md"),
            "",
        ]
    if (results / "e2e.md").is_file():
        parts += ["### SFT step: our trainer vs TRL + PEFT (+ bitsandbytes)", "", _md(results / "e2e.md"), ""]
        parts += [f"![e2e]({rel}/e2e.png)", ""]
    if (results / "layers.json").is_file():
        data = json.loads((results / "layers.json").read_text())
        peaks = data.get("peaks", {})
        nf4 = [r for r in data["rows"] if r["fmt"] == "nf4"]
        parts += [
            f"### Layer: NF4 LoRA layer, fastest of interleaved rounds (all formats: {rel}/layers.md)",
            "",
            f"Measured peaks in the same run: copy {peaks.get('copy_gb_s', float('nan')):.1f} GB/s, fp32 matmul "
            f"{peaks.get('matmul_fp32_gflop_s', float('nan')):.0f} GFLOP/s, bf16 matmul "
            f"{peaks.get('matmul_bf16_gflop_s', float('nan')):.0f} GFLOP/s.",
            "",
            markdown_table(nf4, LAYER_COLUMNS),
            "",
            f"![layers]({rel}/layers_time_vs_m.png)",
            "",
        ]
    if (results / "memory.md").is_file():
        parts += ["### Memory", "", _md(results / "memory.md"), "", f"![memory]({rel}/memory_bars.png)", ""]
    if (results / "methods.md").is_file():
        text = (results / "methods.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1].split("<!-- notes", 1)[0]
        parts += [
            f"### The lecture's methods ({rel}/methods.md has the discussion)",
            "",
            "\n".join(
                "#" + line if line.startswith("## ") else line
                for line in body.strip().splitlines()
                if not line.startswith("<!--")
            ),  # fmt: skip
            "",
            f"![accuracy vs trainable parameters]({rel}/accuracy_vs_params.png)",
            "",
        ]
    if (results / "dequant_cpu.md").is_file():
        parts += [
            "### Dequantization",
            "",
            f"Native C++ decode vs the PyTorch reference vs bitsandbytes: {rel}/dequant_cpu.md (full run); "
            f"the CPU suite reruns the SmolLM2 shape into {rel}/dequant_quick.md.",
            "",
        ]
    for name, title in EXTRA_TABLES:
        if (results / f"{name}.md").is_file():
            parts += [f"### {title} ({rel}/{name}.md)", "", _md(results / f"{name}.md"), ""]
    return "\n".join(parts)


def _machine_line(results: Path) -> str:
    """Who measured: the folder's machine.md when written, else the CPU and compute dtype of its newest file."""
    note = results / "machine.md"
    if note.is_file():
        return note.read_text(encoding="utf-8").strip()
    metas = [json.loads(p.read_text()).get("meta", {}) for p in sorted(results.glob("*.json"))]
    metas = [m for m in metas if m.get("date")]
    if not metas:
        return ""
    meta = max(metas, key=lambda m: m["date"])
    dtype = meta.get("cpu_compute_dtype", "?")
    return f"CPU: {meta.get('cpu')}, {meta.get('cpu_threads')} threads; compute dtype {dtype}."


def render_all(root: Path = RESULTS_DIR) -> str:
    """One section per machine folder under `root` that holds results."""
    sections = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        body = render(folder)
        if body:
            sections.append("\n".join([f"## Results: `{folder.name}`", "", _machine_line(folder), "", body]))
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="the folder of machine folders")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    head = text.split(MARKER, 1)[0]
    README.write_text(head + MARKER + "\n\n" + render_all(args.results) + "\n", encoding="utf-8")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
