"""Regenerate the tiny many-shot ICL task files next to this script (deterministic).

Run ``python configs/data/make_many_icl_tiny.py`` from the repository root.

Synthetic tasks whose rule is hidden from the instruction, so in-context examples genuinely help: a model can only
infer the word → label mapping, the digit shift, the cipher or the word position from the demonstrations. Inputs are
a few short lowercase letters or digits (compact for the tiny byte-level BPE of ``tiny/causal-lm``).

- ``many_icl_tiny_train.jsonl``: 8 training tasks, 100 records each (``split: "train"``).
- ``many_icl_tiny_eval.jsonl``: 20 further records of each training task (``split: "eval"``); generative tasks never
  repeat a training input.
- ``many_icl_tiny_heldout.jsonl``: 2 different tasks, 60 records each (``split: "heldout"``), never trained on: the
  forgetting / in-context learning probe.

Uses only the standard library; a test checks that the committed files equal :func:`render`'s output.
"""

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
SEED = 0
N_TRAIN, N_EVAL, N_HELDOUT = 100, 20, 60
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"

Record = dict[str, object]
Example = tuple[str, str]


def made_up_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct pronounceable non-words (CVC or CVCV) not in ``taken`` (which is updated)."""
    words: list[str] = []
    while len(words) < count:
        word = rng.choice(CONSONANTS) + rng.choice(VOWELS) + rng.choice(CONSONANTS)
        if rng.random() < 0.5:
            word += rng.choice(VOWELS)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def word_label_task(rng: random.Random, labels: list[str], taken: set[str]) -> Callable[[random.Random], Example]:
    """Classification: a per-task random mapping of 12 made-up words onto ``labels``."""
    words = made_up_words(rng, 12, taken)
    mapping = {word: labels[i % len(labels)] for i, word in enumerate(words)}

    def draw(r: random.Random) -> Example:
        word = r.choice(words)
        return word, mapping[word]

    return draw


def threshold_task(rng: random.Random) -> Callable[[random.Random], Example]:
    """Classification: a number is ``big`` above a hidden per-task threshold, else ``small``."""
    threshold = rng.randint(30, 70)

    def draw(r: random.Random) -> Example:
        n = r.randint(0, 99)
        return str(n), "big" if n > threshold else "small"

    return draw


def shift_digits_task(rng: random.Random) -> Callable[[random.Random], Example]:
    """Generative: add a hidden per-task k to each of three digits, mod 10."""
    k = rng.randint(1, 9)

    def draw(r: random.Random) -> Example:
        digits = [r.randint(0, 9) for _ in range(3)]
        return " ".join(map(str, digits)), " ".join(str((d + k) % 10) for d in digits)

    return draw


def reverse_task(rng: random.Random) -> Callable[[random.Random], Example]:
    """Generative: reverse a made-up word."""

    def draw(r: random.Random) -> Example:
        word = "".join(r.choice(CONSONANTS + VOWELS) for _ in range(r.randint(3, 4)))
        return word, word[::-1]

    return draw


def cipher_task(rng: random.Random) -> Callable[[random.Random], Example]:
    """Generative: a hidden per-task substitution cipher over the letters a-h."""
    letters = list("abcdefgh")
    shuffled = letters[:]
    rng.shuffle(shuffled)
    table = dict(zip(letters, shuffled, strict=True))

    def draw(r: random.Random) -> Example:
        word = "".join(r.choice(letters) for _ in range(3))
        return word, "".join(table[c] for c in word)

    return draw


def pick_word_task(rng: random.Random, taken: set[str]) -> Callable[[random.Random], Example]:
    """Generative: answer with the word at a hidden per-task position among three."""
    pool, position = made_up_words(rng, 20, taken), rng.randint(0, 2)

    def draw(r: random.Random) -> Example:
        words = r.sample(pool, 3)
        return " ".join(words), words[position]

    return draw


def swap_task(rng: random.Random, taken: set[str]) -> Callable[[random.Random], Example]:
    """Generative: swap two words."""
    pool = made_up_words(rng, 16, taken)

    def draw(r: random.Random) -> Example:
        a, b = r.sample(pool, 2)
        return f"{a} {b}", f"{b} {a}"

    return draw


def task_specs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(training tasks, held-out tasks): name, family, instruction, options, metric and an example drawer."""
    taken: set[str] = set()

    def spec(name: str, family: str, instruction: str, draw: Callable, options: list[str] | None = None) -> dict:
        metric = "accuracy" if options else "exact_match"
        return {"task": name, "family": family, "instruction": instruction, "options": options, "metric": metric,
                "draw": draw}  # fmt: skip

    labels2, labels3, labels4 = ["yes", "no"], ["positive", "negative", "neutral"], ["cat", "dog", "bird", "frog"]
    train = [
        spec("word_yes_no", "classification", "Label the word.", word_label_task(rng, labels2, taken), labels2),
        spec("word_sentiment", "classification", "Label the word.", word_label_task(rng, labels3, taken), labels3),
        spec("word_animal", "classification", "Which animal is it?", word_label_task(rng, labels4, taken), labels4),
        spec("number_size", "classification", "Is the number big or small?", threshold_task(rng), ["big", "small"]),
        spec("shift_digits", "math", "Transform the digits.", shift_digits_task(rng)),
        spec("reverse_word", "qa", "Transform the word.", reverse_task(rng)),
        spec("letter_cipher", "qa", "Decode the word.", cipher_task(rng)),
        spec("pick_word", "qa", "Answer with one of the words.", pick_word_task(rng, taken)),
    ]
    heldout = [
        spec(
            "word_true_false",
            "classification",
            "Label the word.",
            word_label_task(rng, ["true", "false"], taken),
            ["true", "false"],
        ),  # fmt: skip
        spec("swap_words", "qa", "Transform the words.", swap_task(rng, taken)),
    ]
    return train, heldout


def draw_records(rng: random.Random, spec: dict, count: int, split: str, avoid: set[str]) -> list[Record]:
    """``count`` records of one task; generative tasks get inputs not in ``avoid`` (which is updated)."""
    records: list[Record] = []
    while len(records) < count:
        x, y = spec["draw"](rng)
        if spec["options"] is None:
            if x in avoid:
                continue
            avoid.add(x)
        record: Record = {"task": spec["task"], "family": spec["family"], "instruction": spec["instruction"]}
        record.update(input=x, output=y)
        if spec["options"]:
            record["options"] = spec["options"]
        record.update(metric=spec["metric"], split=split)
        records.append(record)
    return records


def render() -> dict[str, str]:
    """File name → content of the three files, drawn with ``SEED``."""
    rng = random.Random(SEED)
    train_specs, heldout_specs = task_specs(rng)
    train: list[Record] = []
    evaluation: list[Record] = []
    for spec in train_specs:
        seen: set[str] = set()
        train += draw_records(rng, spec, N_TRAIN, "train", seen)
        evaluation += draw_records(rng, spec, N_EVAL, "eval", seen)
    heldout = [r for spec in heldout_specs for r in draw_records(rng, spec, N_HELDOUT, "heldout", set())]
    files = {"train": train, "eval": evaluation, "heldout": heldout}
    return {f"many_icl_tiny_{name}.jsonl": "".join(json.dumps(r) + "\n" for r in rows) for name, rows in files.items()}


def main() -> None:
    """Write the files next to this script."""
    for name, text in render().items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
