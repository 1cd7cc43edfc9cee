"""Train the demo's recipe with changes, then score it on 100 held-out lists (and on the demo's 40).

    .venv/bin/python examples/expenses/score_variant.py OUT_DIR [key=value ...]

Examples: ``r=32 alpha=64``, ``seed=1``, ``quant=int4 group_size=32``; prefix ``QK_CPU_DTYPE=fp32`` to train
in fp32 on a CPU where the policy would pick bf16. Appends one JSON line to OUT_DIR/../variants.jsonl and
prints it. The first 40 of the 100 lists are the demo's held-out lists, so the two scores are comparable with
the demo's report. A run takes about as long as the demo's training plus a minute of decoding.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import qlora_kernels as qk
from qlora_kernels.train import expenses
from qlora_kernels.train.config import TrainConfig, apply_overrides
from qlora_kernels.train.demo import DEMO_CONFIG, N_EVAL, N_TRAIN, conversation
from qlora_kernels.train.evaluate import generate, score, token_budget
from qlora_kernels.train.trainer import train

N_SCORED = 100
STYLE, LANGUAGE = "worked", "ru"


def held_out_lists() -> list[expenses.Expenses]:
    """100 held-out lists whose first 40 are the demo's, none of them in the demo's training lists."""
    train_lists, demo_eval = expenses.make_splits(N_TRAIN, N_EVAL, seed=0)
    _, more = expenses.make_splits(0, N_SCORED, seed=0)
    seen = {e.key for e in train_lists}
    lists = [e for e in more if e.key not in seen]
    if [e.key for e in lists[:N_EVAL]] != [e.key for e in demo_eval]:
        raise RuntimeError("the 100-list split no longer starts with the demo's held-out lists")
    return lists


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out, overrides = Path(argv[0]), argv[1:]
    start = time.time()
    train_lists, _ = expenses.make_splits(N_TRAIN, N_EVAL, seed=0)
    train_file = expenses.write_jsonl(out / "train.jsonl", train_lists, STYLE, LANGUAGE)
    base = {**DEMO_CONFIG, "train_file": str(train_file), "output_dir": str(out / "run"), "progress": False}
    cfg = TrainConfig.from_dict(apply_overrides(base, overrides))
    model, tokenizer = qk.load_model(cfg.model, dtype=cfg.precision().torch_model_dtype)
    result = train(cfg, model=model, tokenizer=tokenizer)

    turns = [conversation(e, STYLE, LANGUAGE) for e in held_out_lists()]
    outputs = generate(model, tokenizer, [t[:-1] for t in turns], token_budget(tokenizer, turns), batch_size=50)
    references = [t[-1]["content"] for t in turns]

    def scored(n: int):
        return score(outputs[:n], references[:n], lambda text: expenses.parse_total(text, LANGUAGE))

    row = {
        "name": out.name,
        "overrides": overrides,
        "precision": result.precision,
        "steps": result.step,
        "loss": result.loss,
        "exact_demo40": scored(N_EVAL).exact,
        "exact_100": scored(N_SCORED).exact,
        "format_100": scored(N_SCORED).format,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.time() - start,
    }
    print(json.dumps(row))
    with (out.parent / "variants.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
