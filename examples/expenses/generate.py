"""Write the expense-total task as JSONL: a training split and a disjoint held-out split.

    python examples/expenses/generate.py --out examples/expenses/data [--style worked|answer] [--language ru|en]

Deterministic: the same arguments give the same files on every machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_kernels.train import expenses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"), help="output folder")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--style", choices=expenses.LABEL_STYLES, default="worked", help="label style")
    parser.add_argument("--language", choices=expenses.LANGUAGES, default="ru")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = expenses.make_splits(args.n_train, args.n_eval, args.seed, args.language)
    out = Path(args.out)
    for name, split in (("train", train), ("eval", held_out)):
        path = expenses.write_jsonl(out / f"{name}.jsonl", split, args.style, args.language)
        print(f"wrote {len(split)} examples to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
