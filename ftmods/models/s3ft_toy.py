"""Two-skill toy LM for S3FT (``shared/specs/s3ft.md`` §1-§3), fully offline on CPU.

A tiny word-level Llama is pre-trained on two synthetic skills:

- **Skill A** (arithmetic word problems, GSM8K-like): the question ``"what is {a} plus {b} ?"`` (``a, b`` in
  ``0..OPERAND_MAX``) has the gold answer ``"{a} plus {b} is {s} #### {s}"``; the model's own answer style is
  ``"{a} plus {b} is {s}"`` (no ``####`` line), so gold targets are off the model's distribution, as in the paper.
- **Skill B** (counting): ``"what comes after {n} ?"`` -> ``"{n+1}"``, for ``n`` in ``0..198``; learnt to 100 %.
  Fine-tuning on skill A and re-measuring skill B measures forgetting.

Both are asked with the S3FT toy prompts :data:`PREDICT_PROMPT` and :data:`PARAPHRASE_PROMPT` (plain templates:
``tokenizer(prompt)`` gives ``<s> prompt``, the training text is ``<s> prompt completion </s>``).

The pre-training corpus plants two *misconceptions* that make the base model partially right, by rule, so that the
behaviour generalises to the held-out S3FT items (none of which is pre-trained):

- predict: for sums ``s >= MISTAKE_FROM`` the pre-training answers are ``s - MISTAKE`` (wrong), below it they are right;
- paraphrase: given the gold answer as a reference, the model restates it in its own style (``"{a} plus {b} is {s}"``,
  right) unless ``s >= STUBBORN_FROM``, where it ignores the reference and keeps its own wrong answer ``s - MISTAKE``.

So on the S3FT training items (:func:`skill_a_items` ``"train"``, stratified 38 / 29 / 29 over the three sum bands)
S3FT keeps the model's answer for small sums, the paraphrase for middle sums and the gold answer for large sums;
:func:`s3ft_sources` measures the split and :func:`build_tiny_s3ft_toy` records it in :data:`SIDECAR_FILE`.

Example::

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_s3ft_toy("/tmp/s3ft-toy")  # 30-45 s on one CPU thread
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    accuracy(model, tokenizer, skill_a_items("eval"), PREDICT_PROMPT)  # 0.4
    accuracy(model, tokenizer, skill_a_items("train"), PARAPHRASE_PROMPT)  # 0.7
    accuracy(model, tokenizer, skill_b_items("probe"), PREDICT_PROMPT)  # 1.0

The items are also committed as GSM8K-style JSONL by ``configs/data/make_s3ft_tiny.py``. Fine-tuning the toy on the
gold answers of the training items forgets more of skill B than fine-tuning on S3FT's selection (e.g. full fine-tuning,
AdamW lr 1e-3, 3 epochs of batch 16: skill B 0.78 after gold SFT vs 0.91 after S3FT targets).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from ftmods.models.generation import generate_texts
from ftmods.models.tiny import _as_dir, _save_model, _seeded
from ftmods.models.toy_world import (
    SPECIAL_TOKENS,
    _lr_factor,
    _one_thread,
    build_word_tokenizer,
    encode_facts,
    fact_margins,
    toy_config,
)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from ftmods.models.toy_world import ToyWorld

__all__ = [
    "DEFAULT_PRETRAIN",
    "MISTAKE",
    "MISTAKE_FROM",
    "N_EVAL",
    "N_TRAIN",
    "NUMBER_MAX",
    "OPERAND_MAX",
    "PARAPHRASE_PROMPT",
    "PREDICT_PROMPT",
    "SIDECAR_FILE",
    "STUBBORN_FROM",
    "Source",
    "ToyReport",
    "accuracy",
    "build_s3ft_tokenizer",
    "build_tiny_s3ft_toy",
    "designed_source",
    "final_number",
    "generate",
    "gold_number",
    "measure",
    "model_answer",
    "paraphrase_answer",
    "pretrain_pairs",
    "pretrain_s3ft_toy",
    "s3ft_sources",
    "skill_a_items",
    "skill_b_items",
    "vocabulary",
    "weights_checksum",
]

PREDICT_PROMPT = "question {question} answer"
"""Prediction prompt (field ``{question}``): ``"question what is 3 plus 4 ? answer"``."""
PARAPHRASE_PROMPT = "question {question} reference {reference} answer"
"""Paraphrase prompt (fields ``{question}``, ``{reference}`` = the gold answer text)."""

NUMBER_MAX = 199
"""Numbers ``0..NUMBER_MAX`` are words of the vocabulary."""
OPERAND_MAX = 49
"""Skill-A operands are ``0..OPERAND_MAX`` (sums ``0..98``)."""
MISTAKE_FROM = 50
"""The base model answers sums ``s >= MISTAKE_FROM`` wrongly (``s - MISTAKE``)."""
MISTAKE = 10
"""The base model's error on large sums."""
STUBBORN_FROM = 75
"""Given a reference with sum ``s >= STUBBORN_FROM``, the base model ignores it and keeps its own (wrong) answer."""
SIDECAR_FILE = "s3ft_toy.json"
"""Name of the JSON sidecar written next to the model by :func:`build_tiny_s3ft_toy`."""

N_TRAIN: dict[str, int] = {"model": 38, "paraphrase": 29, "gold": 29}
"""Number of S3FT training items per designed source (96 in all)."""
N_EVAL: dict[str, int] = {"model": 40, "paraphrase": 30, "gold": 30}
"""Number of held-out skill-A evaluation items per designed source (100 in all)."""
N_PARAPHRASE = 1000
"""Pre-trained pairs that are also pre-trained in the paraphrase format."""
SKILL_B_PROBE_EVERY = 3
"""Skill-B probes are ``n = 0, 3, 6, ...`` (all of skill B is pre-trained)."""
DATA_SEED = 0
"""Seed of the item split (independent of the model's seed)."""

DEFAULT_PRETRAIN: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "lr": 3e-3,
    "weight_decay": 0.1,
    "batch_size": 64,
    "max_steps": 1200,
    "skill_b_repeats": 2,
    "seed": 0,
}
"""Arguments of :func:`pretrain_s3ft_toy` for the default toy."""

_WORDS = ("question", "answer", "reference", "what", "is", "plus", "?", "####", "comes", "after")
_NUMBER = re.compile(r"-?\d+")

Source = Literal["model", "paraphrase", "gold"]
"""Where S3FT takes a training target from."""


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary, tokenizer, items
# ----------------------------------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """The closed vocabulary in id order: ``[PAD] [UNK] <s> </s>``, the numbers ``0..NUMBER_MAX``, the prompt words."""
    return [*SPECIAL_TOKENS, *(str(n) for n in range(NUMBER_MAX + 1)), *_WORDS]


@dataclass(frozen=True)
class _Vocabulary:
    """Stands in for a ``ToyWorld`` in :func:`build_word_tokenizer`, which only calls ``vocabulary()``."""

    words: tuple[str, ...]

    def vocabulary(self) -> list[str]:
        return list(self.words)


def build_s3ft_tokenizer(*, padding_side: Literal["left", "right"] = "left") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`vocabulary`.

    ``toy_world.build_word_tokenizer``: whitespace-split words, ``<s>`` prepended to every encoded text, pad ``[PAD]``
    (id 0) distinct from eos ``</s>`` (id 3), left padding by default.
    """
    return build_word_tokenizer(cast("ToyWorld", _Vocabulary(tuple(vocabulary()))), padding_side=padding_side)


def _question_a(a: int, b: int) -> str:
    return f"what is {a} plus {b} ?"


def _gold_a(a: int, b: int) -> str:
    return f"{a} plus {b} is {a + b} #### {a + b}"


def model_answer(a: int, b: int) -> str:
    """The base model's designed answer to ``(a, b)``: ``"{a} plus {b} is {s'}"``, wrong iff ``a+b >= MISTAKE_FROM``."""
    s = a + b
    return f"{a} plus {b} is {s - MISTAKE if s >= MISTAKE_FROM else s}"


def paraphrase_answer(a: int, b: int) -> str:
    """The base model's designed paraphrase of the gold answer.

    The gold sum in its own style, or its own (wrong) :func:`model_answer` when ``a + b >= STUBBORN_FROM``.
    """
    s = a + b
    return model_answer(a, b) if s >= STUBBORN_FROM else f"{a} plus {b} is {s}"


def designed_source(a: int, b: int) -> Source:
    """The intended S3FT source of ``(a, b)``: sum below ``MISTAKE_FROM`` / ``STUBBORN_FROM`` / else."""
    s = a + b
    return "model" if s < MISTAKE_FROM else "paraphrase" if s < STUBBORN_FROM else "gold"


@cache
def _pair_split() -> dict[str, tuple[tuple[int, int], ...]]:
    """The seeded split of all ``(a, b)`` pairs.

    S3FT train and eval (both stratified by designed source, never pre-trained), pre-training (all the others) and
    paraphrase pre-training (the first ``N_PARAPHRASE`` of those).
    """
    rng = random.Random(DATA_SEED)
    pairs = [(a, b) for a in range(OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)]
    rng.shuffle(pairs)
    train: list[tuple[int, int]] = []
    evaluation: list[tuple[int, int]] = []
    for source in N_TRAIN:
        band = [p for p in pairs if designed_source(*p) == source]
        train += band[: N_TRAIN[source]]
        evaluation += band[N_TRAIN[source] : N_TRAIN[source] + N_EVAL[source]]
    held = set(train) | set(evaluation)
    pretrain = [p for p in pairs if p not in held]
    return {
        "pretrain": tuple(pretrain),
        "pretrain_paraphrase": tuple(pretrain[:N_PARAPHRASE]),
        "train": tuple(rng.sample(train, len(train))),  # seeded shuffles: sources interleaved
        "eval": tuple(rng.sample(evaluation, len(evaluation))),
    }


def skill_a_items(split: Literal["train", "eval"]) -> list[dict[str, str]]:
    """Skill-A records in GSM8K format, ``{"id", "question", "answer"}`` (answer ``"... #### N"``).

    Args:
        split: ``"train"``: the 96 S3FT training items; ``"eval"``: 100 further items. Both are stratified over
            the designed sources (:data:`N_TRAIN`, :data:`N_EVAL`) and never pre-trained.

    Returns:
        The records, in a fixed order.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return [
        {"id": f"s3ft-tiny-{split}-{i:03d}", "question": _question_a(a, b), "answer": _gold_a(a, b)}
        for i, (a, b) in enumerate(_pair_split()[split])
    ]


def skill_b_items(split: Literal["all", "probe"] = "probe") -> list[dict[str, str]]:
    """Skill-B records (``"what comes after {n} ?"`` -> ``"{n+1} #### {n+1}"``), in the same GSM8K-like format.

    Args:
        split: ``"all"``: ``n = 0..NUMBER_MAX - 1`` (all pre-trained); ``"probe"``: every
            :data:`SKILL_B_PROBE_EVERY`-th of them (the forgetting probes).

    Returns:
        The records, in increasing ``n``.
    """
    if split not in ("all", "probe"):
        raise ValueError(f"split must be 'all' or 'probe', got {split!r}")
    step = SKILL_B_PROBE_EVERY if split == "probe" else 1
    return [
        {"id": f"s3ft-tiny-b-{n:03d}", "question": f"what comes after {n} ?", "answer": f"{n + 1} #### {n + 1}"}
        for n in range(0, NUMBER_MAX, step)
    ]


def pretrain_pairs() -> list[tuple[str, str]]:
    """The pre-training corpus as (prompt, completion) pairs, without skill-B repeats.

    Skill A in the predict format with :func:`model_answer` for the pre-training pairs, skill A in the paraphrase
    format with :func:`paraphrase_answer` for a subset of them, then skill B for every ``n``.
    """
    split = _pair_split()
    pairs = [(PREDICT_PROMPT.format(question=_question_a(a, b)), model_answer(a, b)) for a, b in split["pretrain"]]
    pairs += [
        (PARAPHRASE_PROMPT.format(question=_question_a(a, b), reference=_gold_a(a, b)), paraphrase_answer(a, b))
        for a, b in split["pretrain_paraphrase"]
    ]
    pairs += [
        (PREDICT_PROMPT.format(question=item["question"]), item["answer"].split(" #### ")[0])
        for item in skill_b_items("all")
    ]
    return pairs


# ----------------------------------------------------------------------------------------------------------------------
# Judging and accuracy
# ----------------------------------------------------------------------------------------------------------------------


def final_number(text: str) -> str | None:
    """The last integer in ``text`` (``None`` if there is none): ``"3 plus 4 is 7 #### 7"`` -> ``"7"``."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def gold_number(item: dict[str, str]) -> str:
    """The gold number of a record: what follows ``####`` in its ``answer``."""
    return item["answer"].rsplit("####", 1)[-1].strip()


def _render(prompt: str, item: dict[str, str]) -> str:
    return prompt.format(question=item["question"], reference=item["answer"])


def generate(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, str]],
    prompt: str,
    *,
    batch_size: int = 128,
    max_new_tokens: int = 10,
) -> list[str]:
    """Greedy completions of ``prompt`` (fields ``{question}``, ``{reference}`` = the record's answer) per record."""
    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids = [torch.tensor(tokenizer(_render(prompt, item))["input_ids"]) for item in chunk]
        texts += generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens)
    return texts


def _correct(model: Any, tokenizer: Any, items: Sequence[dict[str, str]], prompt: str) -> list[bool]:
    outputs = generate(model, tokenizer, items, prompt)
    return [final_number(out) == gold_number(item) for out, item in zip(outputs, items, strict=True)]


def accuracy(model: Any, tokenizer: Any, items: Sequence[dict[str, str]], prompt: str = PREDICT_PROMPT) -> float:
    """Greedy accuracy: the last number of the completion of ``prompt`` equals the record's gold number.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (``pad_token_id`` set).
        items: Records ``{"question", "answer"}`` (answer ending in ``#### N``).
        prompt: A template with ``{question}`` and optionally ``{reference}`` (filled with the record's answer), e.g.
            :data:`PREDICT_PROMPT` or :data:`PARAPHRASE_PROMPT`.

    Returns:
        The fraction judged correct (``nan`` for no items).
    """
    if not items:
        return float("nan")
    correct = _correct(model, tokenizer, items, prompt)
    return sum(correct) / len(correct)


def s3ft_sources(model: Any, tokenizer: Any, items: Sequence[dict[str, str]]) -> list[Source]:
    """S3FT's selection per record with the toy prompts and last-number judging.

    ``"model"`` if the :data:`PREDICT_PROMPT` answer is right, else ``"paraphrase"`` if the :data:`PARAPHRASE_PROMPT`
    answer is right, else ``"gold"``.
    """
    own = _correct(model, tokenizer, items, PREDICT_PROMPT)
    para = _correct(model, tokenizer, items, PARAPHRASE_PROMPT)
    return ["model" if o else "paraphrase" if p else "gold" for o, p in zip(own, para, strict=True)]


def weights_checksum(model: Any) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training and the builder
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ToyReport:
    """What :func:`build_tiny_s3ft_toy` measured (accuracies are greedy last-number accuracies in [0, 1])."""

    steps: int
    """Optimizer steps of the pre-training."""
    num_parameters: int
    """Number of model parameters."""
    pretrain_accuracy: float
    """Teacher-forced greedy exact match on the whole pre-training corpus."""
    skill_a_train: float
    """Skill A on the S3FT training items, :data:`PREDICT_PROMPT` (share of ``model`` sources)."""
    skill_a_eval: float
    """Skill A on the held-out eval items, :data:`PREDICT_PROMPT`."""
    paraphrase_train: float
    """:data:`PARAPHRASE_PROMPT` on the S3FT training items (does the paraphrase keep the gold number)."""
    paraphrase_eval: float
    """:data:`PARAPHRASE_PROMPT` on the eval items."""
    skill_b: float
    """Skill B on all ``n`` (:data:`PREDICT_PROMPT`)."""
    skill_b_probe: float
    """Skill B on the probes."""
    sources_train: dict[str, int]
    """S3FT selection on the training items: counts of ``model`` / ``paraphrase`` / ``gold``."""
    design_agreement: float
    """Share of training items whose measured source is the designed one (:func:`designed_source`)."""


def pretrain_s3ft_toy(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    hidden_size: int = DEFAULT_PRETRAIN["hidden_size"],
    intermediate_size: int = DEFAULT_PRETRAIN["intermediate_size"],
    num_hidden_layers: int = DEFAULT_PRETRAIN["num_hidden_layers"],
    num_attention_heads: int = DEFAULT_PRETRAIN["num_attention_heads"],
    lr: float = DEFAULT_PRETRAIN["lr"],
    weight_decay: float = DEFAULT_PRETRAIN["weight_decay"],
    batch_size: int = DEFAULT_PRETRAIN["batch_size"],
    max_steps: int = DEFAULT_PRETRAIN["max_steps"],
    skill_b_repeats: int = DEFAULT_PRETRAIN["skill_b_repeats"],
    seed: int = DEFAULT_PRETRAIN["seed"],
) -> LlamaForCausalLM:
    """Pre-train the toy Llama on :func:`pretrain_pairs` (skill-B pairs repeated ``skill_b_repeats`` times).

    The loop of ``toy_world.pretrain_toy_lm`` with a fixed step budget: CE on the completion and ``</s>`` only, AdamW
    (betas 0.9 / 0.98), seeded epoch-wise shuffling, 5 % linear warmup then cosine decay to 10 %, one CPU thread in a
    forked RNG (deterministic; the caller's RNG and thread count are restored).

    Args:
        tokenizer: The toy tokenizer; :func:`build_s3ft_tokenizer` when None.
        hidden_size: Model width.
        intermediate_size: MLP width.
        num_hidden_layers: Number of layers.
        num_attention_heads: Number of attention heads (and KV heads).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Sequences per step.
        max_steps: Optimizer steps.
        skill_b_repeats: How many times each skill-B pair appears in the corpus.
        seed: Seed of the initialisation and the data order.

    Returns:
        The model in eval mode, with the tokenizer's special ids in its generation config.
    """
    from transformers import LlamaForCausalLM

    tokenizer = build_s3ft_tokenizer() if tokenizer is None else tokenizer
    pairs = pretrain_pairs()
    n_b = len(skill_b_items("all"))
    pairs += pairs[-n_b:] * (skill_b_repeats - 1)
    input_ids, attention_mask, labels = encode_facts(tokenizer, pairs)  # (N, T) each
    n, batch_size = input_ids.shape[0], min(batch_size, input_ids.shape[0])
    dims = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
    }
    with _one_thread(), _seeded(seed):
        model = LlamaForCausalLM(toy_config(tokenizer, dims))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
        warmup = max(1, max_steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, max_steps))
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for _ in range(max_steps):
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(n)])
            idx, order = order[:batch_size], order[batch_size:]
            model(input_ids=input_ids[idx], attention_mask=attention_mask[idx], labels=labels[idx]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    model.eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def measure(model: Any, tokenizer: PreTrainedTokenizerFast, *, steps: int = 0) -> ToyReport:
    """Measure the toy's accuracies and S3FT split (see :class:`ToyReport`)."""
    train, evaluation = skill_a_items("train"), skill_a_items("eval")
    with _one_thread():
        sources = s3ft_sources(model, tokenizer, train)
        designed = [designed_source(*map(int, _NUMBER.findall(item["question"]))) for item in train]
        margins = fact_margins(model, *encode_facts(tokenizer, pretrain_pairs()))  # (N,)
        return ToyReport(
            steps=steps,
            num_parameters=sum(p.numel() for p in model.parameters()),
            pretrain_accuracy=(margins > 0).float().mean().item(),
            skill_a_train=sum(s == "model" for s in sources) / len(train),
            skill_a_eval=accuracy(model, tokenizer, evaluation, PREDICT_PROMPT),
            paraphrase_train=accuracy(model, tokenizer, train, PARAPHRASE_PROMPT),
            paraphrase_eval=accuracy(model, tokenizer, evaluation, PARAPHRASE_PROMPT),
            skill_b=accuracy(model, tokenizer, skill_b_items("all"), PREDICT_PROMPT),
            skill_b_probe=accuracy(model, tokenizer, skill_b_items("probe"), PREDICT_PROMPT),
            sources_train={key: Counter(sources)[key] for key in ("model", "paraphrase", "gold")},
            design_agreement=sum(s == d for s, d in zip(sources, designed, strict=True)) / len(train),
        )


def build_tiny_s3ft_toy(folder: str | Path) -> Path:
    """Pre-train the default toy and save it into ``folder``.

    Writes the model (``save_pretrained``, safetensors), the tokenizer and :data:`SIDECAR_FILE`: the prompt templates,
    the design constants, the pre-training arguments, the measured :class:`ToyReport` and the
    :func:`weights_checksum` (no wall time, so two builds are byte-identical).

    Args:
        folder: Output folder (created if missing).

    Returns:
        ``folder``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Raises:
        RuntimeError: If a source has fewer than 10 % of the training items or skill B is below 95 %.
    """
    path = _as_dir(folder)
    tokenizer = build_s3ft_tokenizer()
    model = pretrain_s3ft_toy(tokenizer, **DEFAULT_PRETRAIN)
    report = measure(model, tokenizer, steps=DEFAULT_PRETRAIN["max_steps"])
    n_train = len(skill_a_items("train"))
    if min(report.sources_train.values()) < 0.1 * n_train or report.skill_b < 0.95:
        raise RuntimeError(f"the S3FT toy missed its design: {report}")
    _save_model(model, path)
    tokenizer.save_pretrained(path)
    sidecar = {
        "prompts": {"predict": PREDICT_PROMPT, "paraphrase": PARAPHRASE_PROMPT},
        "design": {
            "operand_max": OPERAND_MAX,
            "mistake_from": MISTAKE_FROM,
            "mistake": MISTAKE,
            "stubborn_from": STUBBORN_FROM,
            "n_train": N_TRAIN,
            "n_eval": N_EVAL,
        },
        "pretrain": DEFAULT_PRETRAIN,
        "measured": asdict(report),
        "weights_sha256": weights_checksum(model),
    }
    (path / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
