"""Regenerate ``locft_tiny_edits.jsonl`` (deterministic): ``python configs/data/make_locft_tiny.py``.

The file holds counterfactual capital edits in the LocFT processed JSON format (CounterFact-like keys ``case_id``,
``prompt``, ``target_new``, ``ground_truth``, ``subject``, ``rephrase_prompt``, ``locality_prompt``,
``locality_ground_truth``), one JSON object per line. They are drawn from the default toy world
(``ftmods.models.toy_world.default_world()``), the world that ``tiny/locft-toy`` is pre-trained on, so every
``ground_truth`` / ``locality_ground_truth`` is the cached model's greedy answer. A test checks that the committed file
equals :func:`render`'s output.
"""

import json
from pathlib import Path

from ftmods.models.toy_world import default_world, edit_requests

HERE = Path(__file__).parent
EDITS_FILE = HERE / "locft_tiny_edits.jsonl"
N_EDITS = 40
SEED = 0


def render() -> str:
    """The content of ``locft_tiny_edits.jsonl``: ``N_EDITS`` edits of the default world drawn with ``SEED``."""
    return "".join(json.dumps(record) + "\n" for record in edit_requests(default_world(), N_EDITS, seed=SEED))


def main() -> None:
    """Write the file."""
    EDITS_FILE.write_text(render())


if __name__ == "__main__":
    main()
