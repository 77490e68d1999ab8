"""Regenerate the tiny SFT data files next to this script (deterministic): ``python configs/data/make_tiny_sft.py``."""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """An addition question and its worded answer."""
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", f"The answer is {a + b}."


def sentiment(rng: random.Random) -> tuple[str, str]:
    """A one-word sentiment question and its label."""
    good = ["great", "lovely", "wonderful", "excellent", "fun"]
    bad = ["awful", "boring", "terrible", "bad", "dull"]
    label = rng.choice(["positive", "negative"])
    word = rng.choice(good if label == "positive" else bad)
    return f"Classify the sentiment: the movie was {word}.", label


def main() -> None:
    """Write the three files."""
    rng = random.Random(0)
    with (HERE / "sft_tiny_qa.jsonl").open("w") as f:
        for _ in range(48):
            prompt, completion = rng.choice([arithmetic, sentiment])(rng)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    with (HERE / "sft_tiny_chat.jsonl").open("w") as f:
        for _ in range(48):
            (p1, c1), (p2, c2) = arithmetic(rng), sentiment(rng)
            messages = [
                {"role": "user", "content": p1},
                {"role": "assistant", "content": c1},
                {"role": "user", "content": p2},
                {"role": "assistant", "content": c2},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    with (HERE / "sft_tiny_val.jsonl").open("w") as f:
        for _ in range(16):
            prompt, completion = rng.choice([arithmetic, sentiment])(rng)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
