import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from ftmods.models.generation import generate_texts, left_pad
from ftmods.models.loading import load_causal_lm, load_tokenizer
from ftmods.ops import split_prompt_and_target
from ftmods.reporting import log_table, markdown_table


def test_split_prompt_and_target_padded_and_packed():
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, -100, -100, -100]])
    pairs = split_prompt_and_target(ids, labels)
    assert len(pairs) == 1  # the second row supervises nothing
    assert pairs[0][0].tolist() == [1, 2]
    assert pairs[0][1].tolist() == [3, 4]
    packed_ids = torch.tensor([[1, 2, 3, 5, 6, 7, 8]])
    packed_labels = torch.tensor([[-100, -100, 3, -100, -100, 7, 8]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    pairs = split_prompt_and_target(packed_ids, packed_labels, positions)
    assert [(p.tolist(), t.tolist()) for p, t in pairs] == [([1, 2], [3]), ([5, 6], [7, 8])]


def test_markdown_table_escapes():
    table = markdown_table([{"a": "x|y", "b": "1\n2"}])
    assert table.splitlines()[2] == "| x\\|y | 1<br>2 |"


def test_log_table_writes_jsonl_per_step(tmp_path):
    trainer = Trainer(logger=CSVLogger(tmp_path), accelerator="cpu")
    path = log_table(trainer, "val/completions", [{"prompt": "p", "completion": "c"}])
    assert path.name == "step=0.jsonl"
    assert json.loads(path.read_text()) == {"prompt": "p", "completion": "c"}
    assert log_table(trainer, "val/completions", []) is None


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_texts_matches_unbatched_greedy(batch):
    """Left padding must not change greedy continuations: batched == one prompt at a time."""
    model, tok = load_causal_lm("tiny/causal-lm"), load_tokenizer("tiny/causal-lm")
    prompts = [torch.tensor(tok(t)["input_ids"]) for t in ["What is 2 + 3?", "Hi", "Classify: great"][:batch]]
    together = generate_texts(model, tok, prompts, max_new_tokens=6)
    alone = [generate_texts(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert model.training is False  # from_pretrained leaves eval mode; generate_texts restored it
    ids, mask = left_pad(prompts, tok.pad_token_id)
    assert mask.sum(1).tolist() == [len(p) for p in prompts]
