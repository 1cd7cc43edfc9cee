"""The lecture's SFT task: sum a list of expenses, answer exactly "Итого: X рублей.".

Deterministic (a seed gives the same examples on every machine), with a held-out split that
shares no list with the training split, and two label styles:
* "worked": the running sum first, then the answer ("55 + 80 = 135; 135 + 230 = 365. Итого: 365 рублей.")
* "answer": the answer only ("Итого: 365 рублей.")
A 135M model learns the format from either, but the sum only from worked labels: the labels'
format decides what the model can learn.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

LABEL_STYLES = ("worked", "answer")
LANGUAGES = ("ru", "en")
MIN_ITEMS, MAX_ITEMS = 3, 5
MIN_AMOUNT, MAX_AMOUNT, AMOUNT_STEP = 10, 500, 5  # the lecture's amounts: 55, 80, 230
EVAL_SEED_OFFSET = 1_000_000  # the held-out split draws from its own stream

ITEMS = {
    "ru": [
        "Хлеб",
        "Молоко",
        "Фрукты",
        "Овощи",
        "Сыр",
        "Мясо",
        "Рыба",
        "Кофе",
        "Чай",
        "Такси",
        "Метро",
        "Кино",
        "Книги",
        "Обед",
        "Ужин",
        "Интернет",
        "Телефон",
        "Бензин",
        "Лекарства",
        "Подарок",
        "Цветы",
        "Яйца",
        "Сок",
        "Крупа",
        "Шоколад",
    ],
    "en": [
        "Bread",
        "Milk",
        "Fruit",
        "Vegetables",
        "Cheese",
        "Meat",
        "Fish",
        "Coffee",
        "Tea",
        "Taxi",
        "Metro",
        "Cinema",
        "Books",
        "Lunch",
        "Dinner",
        "Internet",
        "Phone",
        "Petrol",
        "Medicine",
        "Gift",
        "Flowers",
        "Eggs",
        "Juice",
        "Cereal",
        "Chocolate",
    ],
}
TEMPLATES = {
    "ru": ('Проанализируй список расходов и вычисли общую сумму:\n\n{items}\n\nОтвет верни в виде: "Итого: X рублей".'),
    "en": 'Analyze the list of expenses and compute the total:\n\n{items}\n\nReturn the answer as: "Total: X rubles".',
}
ANSWERS = {"ru": "Итого: {total} рублей.", "en": "Total: {total} rubles."}
ANSWER_RE = {
    "ru": re.compile(r"Итого:\s*(\d+)\s*рублей\.?\s*$"),
    "en": re.compile(r"Total:\s*(\d+)\s*rubles\.?\s*$"),
}


@dataclass(frozen=True)
class Expenses:
    """One task instance: (item, amount) pairs."""

    items: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(a for _, a in self.items)

    @property
    def key(self) -> tuple[int, ...]:
        """What makes two lists 'the same' for the split: the amounts in order."""
        return tuple(a for _, a in self.items)


def sample(rng: random.Random, language: str = "ru") -> Expenses:
    n = rng.randint(MIN_ITEMS, MAX_ITEMS)
    names = rng.sample(ITEMS[language], n)
    amounts = [rng.randrange(MIN_AMOUNT, MAX_AMOUNT + 1, AMOUNT_STEP) for _ in range(n)]
    return Expenses(tuple(zip(names, amounts, strict=True)))


def prompt(e: Expenses, language: str = "ru") -> str:
    return TEMPLATES[language].format(items="\n".join(f"{name}: {amount}" for name, amount in e.items))


def completion(e: Expenses, style: str = "worked", language: str = "ru") -> str:
    """The label: the answer line, preceded by the running sum in the worked style."""
    if style not in LABEL_STYLES:
        raise ValueError(f"label style must be one of {LABEL_STYLES}, got {style!r}")
    answer = ANSWERS[language].format(total=e.total)
    if style == "answer":
        return answer
    steps, running = [], e.items[0][1]
    for _, amount in e.items[1:]:
        steps.append(f"{running} + {amount} = {running + amount}")
        running += amount
    return "; ".join(steps) + ". " + answer


def parse_total(text: str, language: str = "ru") -> int | None:
    """The X of an output that ends with the answer line "Итого: X рублей." (None: wrong format)."""
    m = ANSWER_RE[language].search(text.strip())
    return int(m.group(1)) if m else None


def make_splits(
    n_train: int, n_eval: int, seed: int = 0, language: str = "ru"
) -> tuple[list[Expenses], list[Expenses]]:
    """(train, held-out): no amount list of the held-out split occurs in the training split."""
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    eval_rng = random.Random(seed + EVAL_SEED_OFFSET)
    held_out: dict[tuple[int, ...], Expenses] = {}
    while len(held_out) < n_eval:
        e = sample(eval_rng, language)
        held_out.setdefault(e.key, e)
    train_rng = random.Random(seed)
    train: list[Expenses] = []
    while len(train) < n_train:
        e = sample(train_rng, language)
        if e.key not in held_out:
            train.append(e)
    return train, list(held_out.values())


def to_record(e: Expenses, style: str = "worked", language: str = "ru") -> dict[str, str]:
    return {"prompt": prompt(e, language), "completion": completion(e, style, language)}


def write_jsonl(path: str | Path, examples: list[Expenses], style: str = "worked", language: str = "ru") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(to_record(e, style, language), ensure_ascii=False) + "\n")
    return path
