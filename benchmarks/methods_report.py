"""methods.md for the method comparison: the table, the lecture's claims checked against it, notes.

The claims table is computed from the rows, so a rerun updates it; hand-written notes below the
``<!-- notes -->`` marker of an existing methods.md are kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.sft import METHOD_COLUMNS

NOTES_MARKER = "<!-- notes: hand-written below this line, kept when the suite rewrites the file -->"


def _by_method(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows that ran, keyed by (method, quant): ("qlora", "nf4"), ("lora", "none"), ..."""
    return {(r["method"], r.get("quant", "none")): r for r in rows if "error" not in r}


def stderr(p: float, n: int) -> float:
    """Binomial standard error of a fraction p over n examples."""
    return math.sqrt(max(p * (1 - p), 1 / (4 * n)) / max(n, 1))


def claims(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The lecture's claims about the methods, each with the measured evidence and whether it holds here."""
    m = _by_method(rows)
    full, lora = m.get(("full", "none")), m.get(("lora", "none"))
    qlora, prompt = m.get(("qlora", "nf4")), m.get(("prompt", "none"))
    adapter, partial = m.get(("adapter", "none")), m.get(("partial", "none"))
    out: list[dict[str, str]] = []

    def add(claim: str, holds: bool | None, evidence: str) -> None:
        out.append({"claim": claim, "holds": {True: "yes", False: "no", None: "n/a"}[holds], "evidence": evidence})

    pct = lambda x: f"{100 * x:.0f}%"
    if prompt and all(m.values()):
        fewest = min(m.values(), key=lambda r: r["trainable_params"])
        cheapest_mem = min(m.values(), key=lambda r: r["train_peak_rss_mb"])
        fastest = min(m.values(), key=lambda r: r["step_seconds"])
        add(
            "Prompt tuning needs the least resources",
            fewest is prompt and cheapest_mem is prompt and fastest is prompt,
            f"fewest trainable params: {fewest['label']} ({prompt['trainable_params']:,} for prompt tuning); "
            f"lowest training peak RSS: {cheapest_mem['label']} ({cheapest_mem['train_peak_rss_mb']:.0f} MB, "
            f"prompt {prompt['train_peak_rss_mb']:.0f} MB); fastest step: {fastest['label']} "
            f"({fastest['step_seconds']:.2f} s, prompt {prompt['step_seconds']:.2f} s) - the backward pass still "
            "runs through every layer",
        )
    if prompt and lora and adapter:
        holds = prompt["exact"] <= min(lora["exact"], adapter["exact"]) and prompt["format"] <= min(
            lora["format"], adapter["format"]
        )
        add(
            "Prompt tuning is weaker than adapters and LoRA",
            holds,
            f"format / exact: prompt {pct(prompt['format'])} / {pct(prompt['exact'])}, LoRA {pct(lora['format'])} / "
            f"{pct(lora['exact'])}, adapters {pct(adapter['format'])} / {pct(adapter['exact'])}",
        )
    if lora and full:
        n = full["n_eval"]
        tol = 2 * stderr((full["exact"] + lora["exact"]) / 2, n)
        add(
            "LoRA comes near full SFT",
            abs(lora["exact"] - full["exact"]) <= tol and lora["format"] >= full["format"] - tol,
            f"exact {pct(lora['exact'])} (LoRA) vs {pct(full['exact'])} (full), format {pct(lora['format'])} vs "
            f"{pct(full['format'])}; 'near' = within 2 standard errors ({pct(tol)} at n={n}) with "
            f"{lora['trainable_params'] / full['trainable_params']:.1%} of the trainable parameters",
        )
    if qlora and lora:
        add(
            "4-bit (QLoRA NF4) saves memory compared with a 16-bit base",
            qlora["train_peak_rss_mb"] < lora["train_peak_rss_mb"],
            f"training peak RSS {qlora['train_peak_rss_mb']:.0f} MB (NF4) vs {lora['train_peak_rss_mb']:.0f} MB "
            f"(bf16 LoRA), process peak {qlora['peak_rss_mb']:.0f} vs {lora['peak_rss_mb']:.0f} MB; step "
            f"{qlora['step_seconds']:.2f} s vs {lora['step_seconds']:.2f} s; exact {pct(qlora['exact'])} vs "
            f"{pct(lora['exact'])}",
        )
    if partial and full:
        add(
            "Partial training saves memory and time; its metrics may be lower than full SFT",
            partial["train_peak_rss_mb"] < full["train_peak_rss_mb"] and partial["step_seconds"] < full["step_seconds"],
            f"peak {partial['train_peak_rss_mb']:.0f} vs {full['train_peak_rss_mb']:.0f} MB, step "
            f"{partial['step_seconds']:.2f} vs {full['step_seconds']:.2f} s, exact {pct(partial['exact'])} vs "
            f"{pct(full['exact'])}",
        )
    if adapter and full:
        add(
            "Adapters train far fewer weights than the model",
            adapter["trainable_params"] < full["trainable_params"] / 20,
            f"{adapter['trainable_params']:,} vs {full['trainable_params']:,} trainable parameters; "
            f"adapter file {adapter['adapter_bytes'] / 2**20:.1f} MiB",
        )
    return out


def write_markdown(payload: dict[str, Any], path: Path) -> Path:
    """methods.md: settings, the table, the claims table; notes after NOTES_MARKER survive a rewrite."""
    rows, settings, meta = payload["rows"], payload["settings"], payload["meta"]
    notes = ""
    if path.is_file() and NOTES_MARKER in (text := path.read_text(encoding="utf-8")):
        notes = text.split(NOTES_MARKER, 1)[1].strip()
    shown = [
        {**r, "lr": r.get("lr"), "label": r["label"] + (f" (error: {r['error']})" if "error" in r else "")}
        for r in rows
    ]
    n_eval = settings.get("eval_n")
    lines = [
        "# The lecture's fine-tuning methods on the expense task (SmolLM2-135M-Instruct, this CPU)",
        "",
        f"<!-- {meta['machine']}, torch {meta['versions']['torch']}, commit {meta['git_commit']}, {meta['date']}, "
        f"load average {meta['load_average']} -->",
        f"Same budget for every method: {settings['steps']} steps x batch {settings['batch_size']} (worked labels, "
        f"max_length {settings['max_length']}), bf16 autocast, AdamW, warmup + cosine; each method at its usual LR "
        f"(column LR). Held-out: {n_eval} lists never seen in training, greedy decoding; format = the answer line "
        "`Итого: <int> рублей.` is there, exact = its number is the true sum. Peak RSS is measured in a fresh "
        "process per method: 'train peak' from the first step to the last, 'process peak' including model load. "
        f"s / step averages the steps after the first {settings['warmup_steps']}. Command: "
        "`.venv/bin/python -m benchmarks.suite --suite methods` "
        f"({payload['seconds'] / 60:.0f} min)."
        + "".join(f" Rerun later: {', '.join(r['labels'])} ({r['date']})." for r in payload.get("reruns", [])),
        "",
        markdown_table(shown, METHOD_COLUMNS),
        "",
        f"With n = {n_eval}, one example is {100 / max(n_eval or 1, 1):.0f} points and the standard error of a "
        f"fraction near 50% is about {100 * stderr(0.5, n_eval or 1):.0f} points: small differences are noise.",
        "",
        "## The lecture's claims against these numbers (computed from the table)",
        "",
        markdown_table(claims(rows), [("claim", "claim"), ("holds", "holds here"), ("evidence", "evidence")]),
        "",
        NOTES_MARKER,
        "",
        notes,
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
