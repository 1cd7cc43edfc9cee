"""Fast checks of the benchmark code paths (no timing asserts): imports, summary rows, reports, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import methods_report, sft, sft_child, suite  # noqa: E402
from benchmarks.layers import LayerCase  # noqa: E402
from benchmarks.run_layers import case_flops, cases, run_layer_suite  # noqa: E402


def _layer_rows() -> list[dict]:
    return [
        {"case": "nf4 64x64 M=1 fwd+bwd", "fmt": "nf4", "k": 64, "n": 64, "m": 1, "mode": "fwd+bwd", "ours_ms": 1.0,
         "bf16+lora_ms": 1.5, "bnb+peft_ms": 2.0},
        {"case": "nf4 64x64 M=16 fwd+bwd", "fmt": "nf4", "k": 64, "n": 64, "m": 16, "mode": "fwd+bwd", "ours_ms": 3.0,
         "bf16+lora_ms": 2.0, "bnb+peft_ms": 2.0},
        {"case": "nf4 64x64 M=1 fwd", "fmt": "nf4", "k": 64, "n": 64, "m": 1, "mode": "fwd", "ours_ms": 0.5,
         "bf16+lora_ms": 0.4, "bnb+peft_ms": 0.6},
    ]  # fmt: skip


MEMORY_ROWS = [
    {"provider": "ours", "peak_mb": 400.0, "step_peak_mb": 410.0, "rss_before_step_mb": 390.0, "step_extra_mb": 20.0},
    {
        "provider": "bnb+peft",
        "peak_mb": 600.0,
        "step_peak_mb": 620.0,
        "rss_before_step_mb": 560.0,
        "step_extra_mb": 60.0,
    },
]
E2E_ROWS = [
    {"label": "ours qlora nf4", "tokens_per_s": 300.0, "train_peak_rss_mb": 3000.0, "peak_rss_mb": 3100.0,
     "batch_size": 8, "max_length": 256, "measured_steps": 4, "warmup_steps": 2},
    {"label": "trl+peft+bnb nf4", "tokens_per_s": 200.0, "train_peak_rss_mb": 5000.0, "peak_rss_mb": 5100.0},
    {"label": "ours lora bf16", "tokens_per_s": 320.0, "train_peak_rss_mb": 2500.0, "peak_rss_mb": 2600.0},
    {"label": "trl+peft lora bf16", "error": "boom"},
]  # fmt: skip


def test_summary_rows_have_required_keys(tmp_path: Path) -> None:
    rows = suite.cpu_targets(_layer_rows(), MEMORY_ROWS, E2E_ROWS) + suite.gpu_placeholder_rows()
    assert len(rows) == 9
    for row in rows:
        assert set(suite.SUMMARY_KEYS) <= set(row)
    gpu = [r for r in rows if r["name"].startswith("gpu:")]
    assert all(r["met"] is None and r["note"] == suite.NO_GPU_NOTE for r in gpu)
    layer, memory, speed, own_lora, peak = rows[:5]
    assert layer["ratio"] == pytest.approx((2.0 * 2.0) ** 0.5 / (1.0 * 3.0) ** 0.5)  # geomeans, fwd+bwd only
    assert "1/2 cases" in layer["note"]
    assert memory["met"] is True and peak["met"] is True
    assert speed["ratio"] == pytest.approx(1.5) and speed["met"] is False  # the target is >= 1.8x
    assert own_lora["ratio"] == pytest.approx(300 / 320) and own_lora["met"] is True  # the target is >= 0.9x
    path = suite.write_summary(rows, tmp_path)
    data = json.loads(path.read_text())
    assert {"meta", "targets"} <= set(data) and data["meta"]["git_commit"]
    assert (tmp_path / "summary.md").is_file()


def test_summary_without_measurements_is_null() -> None:
    rows = suite.cpu_targets([], [], [])
    assert [r["met"] for r in rows] == [None] * 5
    with pytest.raises(ValueError, match="lacks"):
        suite.write_summary([{"name": "x"}], Path("/nonexistent"))


def test_layer_suite_runs_on_a_tiny_case() -> None:
    assert cases(torch.device("cpu"))  # the CPU grid is non-empty
    rows = run_layer_suite(torch.device("cpu"), rounds=1, case_list=[LayerCase(64, 32, 2, "int8", "fwd+bwd")])
    assert rows[0]["ours_ms"] > 0 and "speedup_vs_bf16+lora" in rows[0]
    assert case_flops(LayerCase(64, 32, 2, "nf4", "fwd")) > 0


def test_plots_and_methods_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    suite.plot_layers(_layer_rows(), tmp_path)
    suite.plot_memory(MEMORY_ROWS, E2E_ROWS, tmp_path)
    sft.plot_e2e(E2E_ROWS, tmp_path / "e2e.png")
    common = {"steps": 2, "n_eval": 20, "step_seconds": 1.0, "adapter_bytes": 1000, "peak_rss_mb": 1.0}
    methods = [
        ("full", "none", 1_000_000, 0.5, 1.0, 900.0),
        ("partial", "none", 100_000, 0.3, 1.0, 700.0),
        ("lora", "none", 10_000, 0.45, 1.0, 500.0),
        ("qlora", "nf4", 10_000, 0.4, 1.0, 400.0),
        ("adapter", "none", 20_000, 0.35, 1.0, 450.0),
        ("prompt", "none", 100, 0.0, 0.2, 300.0),
    ]
    rows = [
        {**common, "label": m, "method": m, "quant": q, "trainable_params": p, "exact": e, "format": f,
         "train_peak_rss_mb": mem}
        for m, q, p, e, f, mem in methods
    ]  # fmt: skip
    sft.plot_accuracy_vs_params(rows, tmp_path / "acc.png")
    checked = {c["claim"]: c["holds"] for c in methods_report.claims(rows)}
    assert checked["Prompt tuning is weaker than adapters and LoRA"] == "yes"
    assert checked["4-bit (QLoRA NF4) saves memory compared with a 16-bit base"] == "yes"
    payload = {"rows": rows, "settings": {**sft.METHODS}, "meta": suite.run_metadata(), "seconds": 60.0}
    path = methods_report.write_markdown(payload, tmp_path / "methods.md")
    path.write_text(path.read_text() + "kept note\n")
    methods_report.write_markdown(payload, path)
    assert "kept note" in path.read_text()
    for name in ("layers_time_vs_m.png", "memory_bars.png", "e2e.png", "acc.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_child_helpers() -> None:
    t = sft_child.throughput([100, 200, 300], [1.0, 1.0, 2.0], warmup_steps=1)
    assert t["tokens_per_s"] == pytest.approx(500 / 3) and t["measured_steps"] == 2
    with pytest.raises(ValueError):
        sft_child.throughput([1], [1.0], warmup_steps=1)
    assert sft_child.peak_rss_mb() > 0
    assert sft.child_env()["PYTHONPATH"].startswith(str(ROOT))


def test_suite_parser_and_its_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = suite.build_parser().parse_args(["--suite", "methods", "--out", "x"])
    assert args.suite == "methods" and args.out == Path("x") and args.rounds == 5 and args.layer_threads == 0
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = [["--rounds", "0"], ["--rounds", "-2"], ["--layer-threads", "-1"], ["--rounds", "x"], ["--out", str(a_file)]]
    for argv in bad:
        with pytest.raises(SystemExit) as exit_info:
            suite.main(argv)
        assert exit_info.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


def test_benchmarks_are_not_part_of_the_installed_command() -> None:
    import qlora_kernels.cli as cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench"])
    common = (ROOT / "benchmarks" / "common.py").read_text()
    assert "qlora_kernels.cli" not in common  # the suites never import the CLI back


def test_readme_tables_render(tmp_path: Path) -> None:
    from benchmarks import readme_tables

    assert readme_tables.render(tmp_path) == ""  # nothing measured yet: nothing pasted
    rows = suite.cpu_targets(_layer_rows(), MEMORY_ROWS, E2E_ROWS)
    suite.write_summary(rows, tmp_path, extra={"suite_seconds": {"total_s": 60.0}})
    assert "Targets" in readme_tables.render(tmp_path)


def test_readme_tables_one_section_per_machine(tmp_path: Path) -> None:
    from benchmarks import readme_tables

    for name in ("cpu", "cpu-bf16"):
        folder = tmp_path / name
        suite.write_summary(suite.cpu_targets(_layer_rows(), MEMORY_ROWS, E2E_ROWS), folder)
    (tmp_path / "cpu" / "machine.md").write_text("A slow-bf16 Xeon.\n")
    (tmp_path / "cpu-bf16" / "e2e.md").write_text("<!-- meta -->\n| run |\n|---|\n")
    (tmp_path / "empty").mkdir()
    text = readme_tables.render_all(tmp_path)
    assert text.count("## Results: ") == 2 and "`empty`" not in text
    assert "A slow-bf16 Xeon." in text
    cpu_part, bf16_part = text.split("## Results: `cpu-bf16`")
    assert "compute dtype" in bf16_part and "![e2e](results/cpu-bf16/e2e.png)" in bf16_part
    assert "e2e" not in cpu_part


def test_gpu_rows_come_from_committed_gpu_checks(tmp_path):
    """Without a committed GPU check the GPU rows are placeholders; with one they carry its ratios."""
    assert all(r["met"] is None for r in suite.gpu_rows(results=tmp_path))
    check = {
        "environment": {"device": "Test GPU"},
        "targets": [{"name": "t", "ours": 0.5, "baseline": None, "unit": "x", "ratio": 0.8, "target": 2.0,
                     "met": False, "note": "n"}],
    }  # fmt: skip
    (tmp_path / "test-gpu").mkdir()
    (tmp_path / "test-gpu" / "gpu_check.json").write_text(json.dumps(check))
    (row,) = suite.gpu_rows(results=tmp_path)
    assert (row["name"], row["ratio"], row["met"]) == ("gpu: t", 0.8, False)
    assert "Test GPU" in row["note"] and "worst case 0.5" in row["note"]
