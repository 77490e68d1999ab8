"""Many-shot ICL episodes: segment-wise encoding, whole-example budgets, sampling, collation, queries, errors.

The tokenizer is the offline tiny ChatML one (``tiny/causal-lm``): byte-level BPE, no bos token (episodes start
without one), eos ``<|im_end|>`` and a distinct pad ``<|endoftext|>``. For the default plain template, segment-wise
tokenization gives exactly the ids of tokenizing the whole episode string (checked below): the byte-level
pre-tokenizer splits at every segment boundary of the template (``:`` / space, newlines).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from ftmods.datamodules.chat import encode_messages
from ftmods.datamodules.many_shot import (
    EncodedTask,
    EpisodeSampler,
    ManyShotCollator,
    ManyShotDataModule,
    ManyShotEncoder,
    ManyShotEpisodes,
    ManyShotExample,
    ManyShotRecord,
    assemble_episode,
    build_query,
    encode_episode,
    episode_pieces,
    split_holdout,
    task_probabilities,
)
from ftmods.datamodules.records import RecordError

IGNORE = -100
SEP = "\n\n"
SHOTS = [("blick", "positive"), ("dax", "negative"), ("37", "40"), ("wug fep", "yes no")]
REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "configs" / "data"


@pytest.fixture(scope="module")
def tok() -> Any:
    from ftmods.models.loading import LoadOptions, load_tokenizer

    return load_tokenizer("tiny/causal-lm", LoadOptions())


def _write(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _task_records(task: str, n: int, *, instruction: str | None = "Label it.", options: bool = True) -> list[dict]:
    """``n`` records with unique inputs ``{task}{i}x`` (never a substring of another)."""
    out = []
    for i in range(n):
        record: dict[str, Any] = {"task": task, "input": f"{task}{i}x", "output": "yes" if i % 3 else "no"}
        if instruction:
            record["instruction"] = instruction
        if options:
            record["options"] = ["yes", "no"]
        out.append(record)
    return out


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    train = _task_records("alpha", 40) + _task_records("beta", 20, options=False) + _task_records("gamma", 12)
    heldout = _task_records("delta", 6, instruction="Other.")
    return {"train": _write(tmp_path / "train.jsonl", train), "heldout": _write(tmp_path / "heldout.jsonl", heldout)}


def _dm(tok: Any, train: str, **kwargs: Any) -> ManyShotDataModule:
    dm = ManyShotDataModule(train, **{"max_length": 160, **kwargs})
    dm.connect(tok)
    dm.setup("fit")
    return dm


def _spans(tok: Any, ids: list[int], shot_index: list[int]) -> dict[int, str]:
    """Decoded text of every shot index's tokens."""
    by_shot: dict[int, list[int]] = collections.defaultdict(list)
    for token, k in zip(ids, shot_index, strict=True):
        if k >= 0:
            by_shot[k].append(token)
    return {k: tok.decode(v) for k, v in by_shot.items()}


# ----------------------------------------------------------------------------------------------- episode builder


def test_plain_pieces_put_the_separator_inside_the_answer() -> None:
    pieces = episode_pieces("Classify.", SHOTS[:2], query="zup")
    assert pieces == [
        ("Classify.\n\n", "header"),
        ("Input: blick\nOutput:", "prefix"),
        (" positive\n\n", "answer"),
        ("Input: dax\nOutput:", "prefix"),
        (" negative\n\n", "answer"),
        ("Input: zup\nOutput:", "prefix"),
    ]
    assert episode_pieces(None, SHOTS[:1], input_template="Q: {input}\nA:", separator="\n###\n") == [
        ("Q: blick\nA:", "prefix"),
        (" positive\n###\n", "answer"),
    ]


def test_decoded_answer_spans_are_exactly_the_answers(tok: Any) -> None:
    assert tok.bos_token_id is None  # so the episode starts with the instruction itself
    episode = encode_episode(tok, episode_pieces("Classify.", SHOTS))
    assert len(episode.input_ids) == len(episode.labels) == len(episode.shot_index)
    assert _spans(tok, episode.input_ids, episode.shot_index) == {k: f" {y}{SEP}" for k, (_, y) in enumerate(SHOTS)}
    for token, label, k in zip(*episode, strict=True):
        assert label == (token if k >= 0 else IGNORE)


def test_segment_wise_ids_equal_whole_string_ids_for_the_plain_template(tok: Any) -> None:
    pieces = episode_pieces("Classify the sentiment of the review.", SHOTS, query="the movie was great")
    whole = tok("".join(text for text, _ in pieces), add_special_tokens=False)["input_ids"]
    assert encode_episode(tok, pieces).input_ids == whole


def test_target_scope_examples_supervises_prefixes_with_their_shot_index(tok: Any) -> None:
    episode = encode_episode(tok, episode_pieces("Classify.", SHOTS), target_scope="examples")
    expected = {k: f"Input: {x}\nOutput: {y}{SEP}" for k, (x, y) in enumerate(SHOTS)}
    assert _spans(tok, episode.input_ids, episode.shot_index) == expected
    header = len(tok("Classify.\n\n", add_special_tokens=False)["input_ids"])
    assert episode.labels[:header] == [IGNORE] * header  # never the instruction
    assert all(label != IGNORE for label in episode.labels[header:])


def test_assemble_episode_with_bos() -> None:
    episode = assemble_episode([([5], "prefix"), ([6, 7], "answer")], bos=1)
    assert episode == ([1, 5, 6, 7], [IGNORE, IGNORE, 6, 7], [-1, -1, 0, 0])


def test_chat_template_masks_equal_prefix_rerendering_masks(tok: Any) -> None:
    pieces = episode_pieces("Classify.", SHOTS, template="chat", tokenizer=tok)
    episode = encode_episode(tok, pieces, add_bos=False)
    messages = [{"role": "system", "content": "Classify."}]
    for x, y in SHOTS:
        messages += [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    ids, labels = encode_messages(tok, messages)
    assert episode.input_ids == ids
    assert episode.labels == labels
    assert _spans(tok, episode.input_ids, episode.shot_index) == {
        k: f"{y}<|im_end|>\n" for k, (_, y) in enumerate(SHOTS)
    }
    with pytest.raises(ValueError, match="needs the tokenizer"):
        episode_pieces("x", SHOTS, template="chat")


# ---------------------------------------------------------------------------------------------------- episodes


def test_episodes_fit_max_length_with_whole_examples_only(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], max_length=90, eval_fraction=0.0)
    assert dm.episodes is not None
    assert dm.encoder is not None
    for index in range(len(dm.episodes)):
        task_id, planned = dm.episodes.plan(0, index)
        example = dm.episodes.episode(0, index)
        task = dm.train_tasks[task_id]
        assert len(example["input_ids"]) <= 90
        assert example["num_shots"] == len(planned) >= 1
        records = [task.records[i] for i in planned]
        text = "".join(t for t, _ in episode_pieces(task.instruction, [(r.input, r.output) for r in records]))
        assert tok.decode(example["input_ids"]) == text  # header + whole examples, nothing cut
        spans = _spans(tok, example["input_ids"], example["shot_index"])
        assert spans == {k: f" {r.output}{SEP}" for k, r in enumerate(records)}
        # full: the next drawn example overflowed (or the pool ran out), so no longest example would fit either
        assert len(example["input_ids"]) + max(task.lengths) > 90 or len(planned) == len(task.records)


def test_shots_are_capped_and_drawn_from_the_range(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], shots=3, max_length=400, episodes_per_epoch=20)
    assert dm.episodes is not None
    assert {dm.episodes.episode(0, i)["num_shots"] for i in range(20)} == {3}
    dm.episodes.shots = (2, 4)
    assert {dm.episodes.episode(0, i)["num_shots"] for i in range(40)} == {2, 3, 4}
    dm.episodes.shots = 500  # more than any pool: capped by the pool and max_length
    assert all(len(dm.episodes.episode(0, i)["input_ids"]) <= 400 for i in range(20))


def test_episodes_are_a_function_of_seed_and_epoch(tok: Any, files: dict[str, str]) -> None:
    a, b = _dm(tok, files["train"]), _dm(tok, files["train"])
    assert a.episodes is not None
    assert b.episodes is not None
    n = len(a.episodes)
    epoch0 = [a.episodes[i]["input_ids"] for i in range(n)]
    assert epoch0 == [b.episodes.episode(0, i)["input_ids"] for i in range(n)]
    assert epoch0 != [a.episodes[n + i]["input_ids"] for i in range(n)]  # keys of epoch 1
    c = _dm(tok, files["train"], seed=1)
    assert c.episodes is not None
    assert epoch0 != [c.episodes.episode(0, i)["input_ids"] for i in range(n)]


def test_resumed_loader_replays_the_same_batches(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], batch_size=2, episodes_per_epoch=8)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning does at the start of epoch 1
    full = [b["input_ids"] for b in loader]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    resumed = _dm(tok, files["train"], batch_size=2, episodes_per_epoch=8).train_dataloader()
    resumed.sampler.set_epoch(1)
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == 2
    assert all(torch.equal(x, y) for x, y in zip(rest, full[2:], strict=True))


class _Recorder:
    """A LightningModule factory that records a fingerprint of every training batch and can crash at a step."""

    @staticmethod
    def module(crash_at: int | None = None) -> Any:
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[int]] = []

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                if self.global_step == crash_at:
                    raise RuntimeError("killed")
                self.seen.append(batch["input_ids"].sum(1).tolist() + batch["task_ids"].tolist())
                return (self.w**2).sum()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Module()


def test_kill_and_resume_mid_epoch_replays_the_same_episodes(tok: Any, files: dict[str, str], tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(module: Any, ckpt_path: str | None = None, **kwargs: Any) -> None:
        dm = ManyShotDataModule(files["train"], max_length=100, batch_size=2, episodes_per_epoch=6)
        dm.connect(tok)
        trainer = L.Trainer(
            max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, **kwargs,
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    full = _Recorder.module()
    fit(full, enable_checkpointing=False)
    assert len(full.seen) == 9
    assert full.seen[:3] != full.seen[3:6]
    killed = _Recorder.module(crash_at=4)  # in the middle of epoch 1
    with pytest.raises(RuntimeError, match="killed"):
        fit(killed, callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)])
    resumed = _Recorder.module()
    fit(resumed, str(tmp_path / "epoch=1-step=4.ckpt"), callbacks=[ModelCheckpoint(tmp_path)])
    assert killed.seen + resumed.seen == full.seen


def test_episode_sampler_shards_ranks_and_offsets_epochs(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], episodes_per_epoch=7)
    assert dm.episodes is not None
    ranks = [list(EpisodeSampler(dm.episodes, epoch=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(set(ranks[0] + ranks[1])) == list(range(14, 21))
    assert len(ranks[0]) == len(ranks[1]) == 4


def _fake_tasks(sizes: list[int]) -> list[EncodedTask]:
    record = ManyShotRecord(task="t", input="x", output="y")
    return [EncodedTask(f"t{i}", None, [record] * n, [], [1] * n, [], []) for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [("uniform", 0.5), ("proportional", 0.8), ("temperature", 2 / 3)],  # T=2: sqrt(80) / (sqrt(80) + sqrt(20))
)
def test_task_sampling_frequencies(tok: Any, sampling: str, expected: float) -> None:
    probabilities = task_probabilities([80, 20], sampling, 2.0)  # type: ignore[arg-type]
    assert probabilities[0] == pytest.approx(expected)
    episodes = ManyShotEpisodes(
        ManyShotEncoder(tok, max_length=8), _fake_tasks([80, 20]), num_episodes=4000, probabilities=probabilities
    )
    share = sum(episodes.plan(0, i)[0] == 0 for i in range(4000)) / 4000
    assert share == pytest.approx(expected, abs=0.03)


# ------------------------------------------------------------------------------------------------------- collate


def _example(ids: list[int], labels: list[int], shots: list[int], task_id: int) -> ManyShotExample:
    return ManyShotExample(input_ids=ids, labels=labels, shot_index=shots, task_id=task_id, num_shots=max(shots) + 1)


EXAMPLES = [
    _example([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8], [-1, -1, 0, 0], 2),
    _example([9, 10, 11], [9, IGNORE, 11], [0, -1, 1], 0),
]


def test_packed_collate_restarts_positions_and_masks_episode_starts() -> None:
    batch = ManyShotCollator(0, packing=True)(EXAMPLES)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8, IGNORE, IGNORE, 11]]
    assert batch["shot_index"].tolist() == [[-1, -1, 0, 0, -1, -1, 1]]
    assert batch["task_ids"].tolist() == [2, 0]
    assert batch["num_shots"].tolist() == [1, 2]
    assert EXAMPLES[1]["labels"][0] == 9  # the inputs are not modified


def test_padded_collate() -> None:
    batch = ManyShotCollator(0, pad_to_multiple_of=8)(EXAMPLES)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 8),
        "labels": (2, 8),
        "shot_index": (2, 8),
        "attention_mask": (2, 8),
        "task_ids": (2,),
        "num_shots": (2,),
    }
    assert batch["input_ids"][1].tolist() == [9, 10, 11, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [9, IGNORE, 11] + [IGNORE] * 5
    assert batch["shot_index"][1].tolist() == [0, -1, 1] + [-1] * 5
    assert batch["attention_mask"].sum(1).tolist() == [4, 3]
    assert all(v.dtype == torch.long for v in batch.values())


def test_train_dataloader_batches(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], batch_size=3, packing=True)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "shot_index", "position_ids", "task_ids", "num_shots"}
    assert batch["task_ids"].shape == (3,)
    assert (batch["position_ids"] == 0).sum() == 3
    assert torch.equal(batch["labels"] != IGNORE, batch["shot_index"] >= 0)
    assert dm.episodes is not None
    assert batch["task_ids"].tolist() == [dm.episodes.plan(0, i)[0] for i in range(3)]


# ---------------------------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_prompt_ids_equal_the_training_episode_up_to_the_query_prefix(tok: Any, template: str) -> None:
    encoder = ManyShotEncoder(tok, template=template, max_length=4096)  # type: ignore[arg-type]
    records = [ManyShotRecord(task="t", input=x, output=y, instruction="Classify.") for x, y in SHOTS]
    task = encoder.task("t", records)
    prompt = encoder.prompt_ids(task, [2, 0, 1], records[3].input)
    episode = encoder.episode(task, [2, 0, 1, 3]).input_ids
    answer = encoder.answer_ids(task, [2, 0, 1], records[3].input, records[3].output)
    assert episode == prompt + answer


def test_queries_hold_out_records_and_encode_options_like_answers(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], eval_fraction=0.25, k_test=4, max_length=160)
    assert [q.task for q in dm.eval_queries].count("alpha") == 10
    assert len(dm.tasks["alpha"]) == 30
    trained = {r.input for pool in dm.tasks.values() for r in pool}
    held = {q.prompt.rsplit("Input: ", 1)[1].removesuffix("\nOutput:") for q in dm.eval_queries}
    assert len(held) == len(dm.eval_queries)
    assert not held & trained
    assert dm.episodes is not None
    episode_text = "".join(tok.decode(dm.episodes.episode(e, i)["input_ids"]) for e in range(3) for i in range(8))
    assert not any(f" {x}\n" in episode_text for x in held)
    for query in dm.eval_queries:
        assert query.k_shots == 4
        assert query.stop == SEP
        assert tok.decode(query.prompt_ids) == query.prompt
        assert query.prompt.count("Input: ") == 5
        demos = query.prompt.rsplit("Input: ", 1)[0]
        assert not any(f" {x}\n" in demos for x in held)
        assert tok.decode(query.output_ids) == f" {query.output}{SEP}"
        if query.options is None:
            assert query.metric == "exact_match"
            assert query.option_ids is None
        else:
            assert query.metric == "accuracy"
            assert [tok.decode(ids) for ids in query.option_ids or []] == [f" {o}{SEP}" for o in query.options]


def test_k_test_is_capped_by_max_length_dropping_whole_demos(tok: Any) -> None:
    encoder = ManyShotEncoder(tok, max_length=60)
    records = [ManyShotRecord(task="t", input=f"w{i}", output="yes", options=("yes", "no")) for i in range(20)]
    task = encoder.task("t", records)
    query = build_query(encoder, task, records[0], range(1, 20), k_test=16, seed="s")
    assert 0 < query.k_shots < 16
    assert len(query.prompt_ids) + max(len(ids) for ids in query.option_ids or []) <= 60
    # the dropped demo overflowed, so no demo of the longest kind fits either
    assert len(query.prompt_ids) + max(task.lengths) + max(len(ids) for ids in query.option_ids or []) > 60


def test_heldout_queries_draw_demos_from_their_own_task(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], heldout_files=files["heldout"], k_test=3, eval_per_task=4, eval_fraction=0.0)
    assert dm.eval_queries == []
    assert len(dm.heldout_queries) == 4
    assert "delta" not in dm.task_names
    for query in dm.heldout_queries:
        assert query.heldout
        assert query.task == "delta"
        assert query.k_shots == 3
        assert query.prompt.startswith("Other.\n\n")
        query_input = query.prompt.rsplit("Input: ", 1)[1].removesuffix("\nOutput:")
        demos = query.prompt.rsplit("Input: ", 1)[0]
        assert demos.count("Input: delta") == 3
        assert f"Input: {query_input}\n" not in demos
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [4]
    assert batches[0] == dm.heldout_queries


def test_eval_files_and_unknown_tasks(tok: Any, files: dict[str, str], tmp_path: Path) -> None:
    evaluation = _write(tmp_path / "eval.jsonl", _task_records("gamma", 3, options=False))
    dm = _dm(tok, files["train"], eval_files=evaluation)
    assert len(dm.eval_queries) == 3
    assert len(dm.tasks["gamma"]) == 12
    unknown = _write(tmp_path / "unknown.jsonl", _task_records("omega", 2))
    with pytest.raises(ValueError, match=r"'omega'.*unknown\.jsonl:1.*heldout_files"):
        _dm(tok, files["train"], eval_files=unknown)


def test_split_holdout_is_seeded() -> None:
    records = [ManyShotRecord(task="t", input=str(i), output="y") for i in range(10)]
    train, held = split_holdout(records, 0.1, "s")
    assert len(held) == 1
    assert sorted(train + held) == list(range(10))
    assert split_holdout(records, 0.1, "s") == (train, held)
    assert split_holdout(records, 0.0, "s") == (list(range(10)), [])


# -------------------------------------------------------------------------------------------------------- errors


def test_missing_output_names_file_line_and_field(tok: Any, tmp_path: Path) -> None:
    records = _task_records("alpha", 4)
    del records[2]["output"]
    path = _write(tmp_path / "broken.jsonl", records)
    with pytest.raises(RecordError, match=r"broken\.jsonl:3: field 'output': missing"):
        _dm(tok, path)


def test_options_must_contain_the_output(tok: Any, tmp_path: Path) -> None:
    records = _task_records("alpha", 4)
    records[1]["options"] = ["maybe", "no"]
    path = _write(tmp_path / "options.jsonl", records)
    with pytest.raises(RecordError, match=r"options\.jsonl:2: field 'options': does not contain the output 'yes'"):
        _dm(tok, path)


def test_bad_metric_is_a_record_error(tok: Any, tmp_path: Path) -> None:
    records = _task_records("alpha", 4)
    records[3]["metric"] = "bleu"
    with pytest.raises(RecordError, match=r"metric\.jsonl:4: field 'metric'"):
        _dm(tok, _write(tmp_path / "metric.jsonl", records))


def test_task_with_too_few_records_for_min_shots(tok: Any, tmp_path: Path) -> None:
    path = _write(tmp_path / "few.jsonl", _task_records("alpha", 10) + _task_records("tiny", 2))
    with pytest.raises(ValueError, match=r"task 'tiny' \(.*few\.jsonl\) has 2 training record\(s\).*min_shots=3"):
        _dm(tok, path, min_shots=3, eval_fraction=0.0)


def test_example_longer_than_max_length(tok: Any, tmp_path: Path) -> None:
    records = _task_records("alpha", 5)
    records[3]["input"] = "long " * 100
    path = _write(tmp_path / "long.jsonl", records)
    with pytest.raises(ValueError, match=r"task 'alpha' \(.*long\.jsonl\).*> max_length=160.*long\.jsonl:4"):
        _dm(tok, path, eval_fraction=0.0)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="below min_shots"):
        ManyShotDataModule("x.jsonl", shots=1, min_shots=2)
    with pytest.raises(ValueError, match="shots must be"):
        ManyShotDataModule("x.jsonl", shots=(4, 2))
    with pytest.raises(ValueError, match="input_template"):
        ManyShotDataModule("x.jsonl", input_template="Q:")


# ------------------------------------------------------------------------------------------------------ TRL export


def test_to_trl_dataset(tok: Any, files: dict[str, str]) -> None:
    dm = _dm(tok, files["train"], target_scope="examples", episodes_per_epoch=5)
    dataset = dm.to_trl_dataset()
    assert dataset.column_names == ["input_ids", "labels", "shot_index", "task"]
    assert len(dataset) == 5
    assert dm.episodes is not None
    for i, row in enumerate(dataset):
        assert row["input_ids"] == dm.episodes.episode(0, i)["input_ids"]
        assert any(label != IGNORE for label in row["labels"][1:])
        assert row["task"] in dm.task_names


# ------------------------------------------------------------------------------------------------ shipped data


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_many_icl_tiny", DATA / "make_many_icl_tiny.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_the_generator_output_and_fit_many_shots(tok: Any) -> None:
    rendered = _generator().render()
    assert sorted(rendered) == [f"many_icl_tiny_{s}.jsonl" for s in ("eval", "heldout", "train")]
    for name, text in rendered.items():
        assert (DATA / name).read_text() == text, f"regenerate {name}: python configs/data/make_many_icl_tiny.py"
    assert sum(len(text) for text in rendered.values()) < 300_000
    dm = _dm(
        tok,
        str(DATA / "many_icl_tiny_train.jsonl"),
        eval_files=str(DATA / "many_icl_tiny_eval.jsonl"),
        heldout_files=str(DATA / "many_icl_tiny_heldout.jsonl"),
        max_length=512,
    )
    assert len(dm.task_names) == 8
    assert len(dm.eval_queries) == 8 * 20
    assert len(dm.heldout_queries) == 2 * 60
    assert dm.episodes is not None
    shots: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(dm.episodes)):
        task_id, planned = dm.episodes.plan(0, i)
        shots[task_id].append(len(planned))
    for task in dm.train_tasks:  # many shots fit in 512 tokens
        assert (512 - len(task.header)) // max(task.lengths) >= 15, task.name
    assert min(min(v) for v in shots.values()) >= 15
    assert all(q.k_shots == 8 for q in dm.eval_queries + dm.heldout_queries)
    rng = random.Random(0)
    for query in rng.sample(dm.eval_queries, 10):
        assert query.output in (query.options or [query.output])
