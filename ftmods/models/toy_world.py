"""Synthetic-facts toy world for model editing (LocFT-BF, ``shared/specs/locft_bf.md`` §6), fully offline on CPU.

A :class:`ToyWorld` holds pseudo-word subjects (``"Tepiva"``), each with a capital city (one token, ``"Varo"``, or two,
``"port Kelo"``) and a currency (``"dusim"``), asked by three templates:

- A :data:`TEMPLATE_EDIT` ``"the capital of {s} is"``: the edit prompt;
- B :data:`TEMPLATE_PARAPHRASE` ``"{s} has its capital city at"``: the paraphrase;
- C :data:`TEMPLATE_OTHER` ``"the currency used in {s} is"``: another relation of the same subject.

:func:`build_word_tokenizer` gives a closed word-level tokenizer over the world's vocabulary, :func:`pretrain_toy_lm`
teaches a tiny Llama every trained fact (100 % greedy accuracy, or it raises), :func:`build_tiny_locft_toy` saves both
(plus ``world.json``) with ``save_pretrained`` and is registered as ``tiny/locft-toy`` in
:data:`ftmods.models.tiny.TINY_MODELS`, and :func:`edit_requests` draws counterfactual edits in the LocFT processed
JSON format (CounterFact-like keys).

Subjects are split into *train* subjects (templates A, B and C are trained) and *probe* subjects (only A and C): the
probes' template-B accuracy measures whether the model stores facts per subject, so that paraphrase generalization is
meaningful. Edits are drawn from the train subjects.

The default world (:data:`DEFAULT_WORLD`: 80 train + 16 probe subjects, 24 cities, 8 currencies; 147 tokens) and model
(:data:`DEFAULT_PRETRAIN`: 4 layers, hidden 64, 0.28 M parameters) are much smaller than the spec's (700 subjects,
1.26 M parameters), so that the build takes seconds on one CPU thread (it runs once per test session); every size is
an argument, so benchmarks can build the spec-size world and model.

Example::

    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftmods.models.tiny import resolve_pretrained

    path = resolve_pretrained("tiny/locft-toy")  # builds and pre-trains once, then reuses the cache
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    world = ToyWorld.load(Path(path) / WORLD_FILE)
    batch = tokenizer(world.prompt(TEMPLATE_EDIT, world.train_subjects[0]), return_tensors="pt")  # "<s> the ... is"
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)  # -> the capital, then "</s>"
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ftmods.models.tiny import _as_dir, _save_model, _seeded

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CITY_PREFIXES",
    "DEFAULT_PRETRAIN",
    "DEFAULT_WORLD",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "TEMPLATE_EDIT",
    "TEMPLATE_OTHER",
    "TEMPLATE_PARAPHRASE",
    "REPORT_FILE",
    "WORLD_FILE",
    "PretrainReport",
    "ToyWorld",
    "build_tiny_locft_toy",
    "build_word_tokenizer",
    "default_world",
    "edit_requests",
    "encode_facts",
    "fact_accuracy",
    "fact_margins",
    "make_world",
    "pretrain_toy_lm",
]

TEMPLATE_EDIT = "the capital of {s} is"
"""Template A: the edit prompt (relation ``capital``)."""
TEMPLATE_PARAPHRASE = "{s} has its capital city at"
"""Template B: a paraphrase of template A (relation ``capital``)."""
TEMPLATE_OTHER = "the currency used in {s} is"
"""Template C: another relation of the same subject (``currency``)."""
TEMPLATES: dict[str, str] = {"A": TEMPLATE_EDIT, "B": TEMPLATE_PARAPHRASE, "C": TEMPLATE_OTHER}
"""The three templates by letter, as in the spec."""

CITY_PREFIXES = ("port", "new", "san", "fort")
"""First words of the two-token cities (``"port Kelo"``)."""
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<s>", "</s>")
"""Special tokens of the word-level tokenizer; they get ids 0-3 in this order (pad, unk, bos, eos)."""
WORLD_FILE = "world.json"
"""Name of the facts file written next to the model by :func:`build_tiny_locft_toy`."""
REPORT_FILE = "pretrain_report.json"
"""Name of the pre-training report written next to the model by :func:`build_tiny_locft_toy`."""

DEFAULT_WORLD: dict[str, int] = {"n_subjects": 96, "n_cities": 24, "n_currencies": 8, "n_probe": 16, "seed": 0}
"""Arguments of :func:`make_world` for the world of ``tiny/locft-toy``: 80 train and 16 probe subjects."""
DEFAULT_PRETRAIN: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "lr": 3e-3,
    "batch_size": 64,
    "max_steps": 2000,
    "min_margin": 1.0,
    "seed": 0,
}
"""Arguments of :func:`pretrain_toy_lm` for the default model (the spec's size is hidden 128, intermediate 512,
4 layers, lr 3e-3, 4,000 steps)."""

_TEMPLATE_WORDS = tuple(dict.fromkeys(" ".join(TEMPLATES.values()).replace("{s}", " ").split()))
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

# ----------------------------------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ToyWorld:
    """A closed world of subjects with a capital city and a currency each.

    Every name is whitespace-free except two-token cities (``"<prefix> <stem>"``, prefix from
    :data:`CITY_PREFIXES`), so a word-level tokenizer encodes subjects and currencies as one token each and cities as
    one or two tokens.
    """

    seed: int
    """Seed that generated the world."""
    train_subjects: list[str]
    """Subjects trained on templates A, B and C; edits are drawn from these."""
    probe_subjects: list[str]
    """Subjects trained on templates A and C only; their template-B accuracy measures paraphrase generalization."""
    cities: list[str]
    """All cities (one-token cities first, then two-token ones)."""
    currencies: list[str]
    """All currencies."""
    capital: dict[str, str] = field(repr=False)
    """``capital[subject]``: the true capital city."""
    currency: dict[str, str] = field(repr=False)
    """``currency[subject]``: the true currency."""

    @property
    def subjects(self) -> list[str]:
        """Train subjects, then probe subjects."""
        return [*self.train_subjects, *self.probe_subjects]

    def vocabulary(self) -> list[str]:
        """The closed vocabulary in id order.

        Special tokens, template words, city prefixes, subjects, city words, currencies (each word once).
        """
        city_words = [w for city in self.cities for w in city.split() if w not in CITY_PREFIXES]
        words = [*SPECIAL_TOKENS, *_TEMPLATE_WORDS, *CITY_PREFIXES, *self.subjects, *city_words, *self.currencies]
        return list(dict.fromkeys(words))

    @staticmethod
    def prompt(template: str, subject: str) -> str:
        """``template`` filled with ``subject`` (e.g. ``ToyWorld.prompt(TEMPLATE_EDIT, "Tepiva")``)."""
        return template.format(s=subject)

    def answer(self, template: str, subject: str) -> str:
        """The true answer of ``template`` for ``subject``: its capital for templates A / B, its currency for C."""
        return self.currency[subject] if template == TEMPLATE_OTHER else self.capital[subject]

    def facts(self, split: Literal["trained", "probe_paraphrase"] = "trained") -> list[tuple[str, str]]:
        """(prompt, answer) pairs.

        Args:
            split: ``"trained"``: templates A, B, C of the train subjects, then A, C of the probe subjects (the
                pre-training data); ``"probe_paraphrase"``: template B of the probe subjects (never trained).

        Returns:
            The pairs, in a fixed order.
        """
        if split == "probe_paraphrase":
            pairs = [(TEMPLATE_PARAPHRASE, s) for s in self.probe_subjects]
        else:
            pairs = [(t, s) for s in self.train_subjects for t in (TEMPLATE_EDIT, TEMPLATE_PARAPHRASE, TEMPLATE_OTHER)]
            pairs += [(t, s) for s in self.probe_subjects for t in (TEMPLATE_EDIT, TEMPLATE_OTHER)]
        return [(self.prompt(t, s), self.answer(t, s)) for t, s in pairs]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the content of ``world.json``), with the templates for reference."""
        return {"templates": dict(TEMPLATES), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyWorld:
        """Inverse of :meth:`to_dict` (the ``templates`` entry is informative and ignored)."""
        return cls(**{k: v for k, v in data.items() if k != "templates"})

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ToyWorld:
        """Read a world written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _pseudo_words(rng: random.Random, n: int, syllables: int, used: set[str], *, capitalize: bool) -> list[str]:
    """``n`` new consonant-vowel pseudo-words of ``syllables`` syllables, none in ``used`` (which is updated)."""
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        word = word.capitalize() if capitalize else word
        if word not in used:
            used.add(word)
            words.append(word)
    return words


def make_world(
    n_subjects: int, n_cities: int, n_currencies: int, seed: int = 0, *, n_probe: int | None = None
) -> ToyWorld:
    """Generate a world: names, the train / probe split and the facts, all from ``random.Random(seed)``.

    Subjects are capitalised 3-syllable pseudo-words; half the cities (rounded down) are two-token
    ``"<prefix> <stem>"`` cities with a random prefix from :data:`CITY_PREFIXES` and a unique stem, the rest one-token
    cities; currencies are lower-case 2-syllable words. Every subject gets a uniformly random capital and currency.
    The spec's world is ``make_world(700, 60, 25, seed, n_probe=100)``.

    Args:
        n_subjects: Number of subjects (train + probe).
        n_cities: Number of cities (at least 2, so that an edit can pick a different one).
        n_currencies: Number of currencies.
        seed: Seed; the same seed gives the same world.
        n_probe: Number of probe subjects (template B never trained); default ``n_subjects // 7``.

    Returns:
        The world.
    """
    n_probe = n_subjects // 7 if n_probe is None else n_probe
    if not 0 <= n_probe < n_subjects or n_cities < 2 or n_currencies < 1:
        raise ValueError(f"invalid sizes: {n_subjects=}, {n_probe=}, {n_cities=}, {n_currencies=}")
    rng = random.Random(seed)
    used = set(_TEMPLATE_WORDS) | set(CITY_PREFIXES) | set(SPECIAL_TOKENS)
    subjects = _pseudo_words(rng, n_subjects, 3, used, capitalize=True)
    n_two = n_cities // 2
    single = _pseudo_words(rng, n_cities - n_two, 2, used, capitalize=True)
    stems = _pseudo_words(rng, n_two, 2, used, capitalize=True)
    cities = single + [f"{rng.choice(CITY_PREFIXES)} {stem}" for stem in stems]
    currencies = _pseudo_words(rng, n_currencies, 2, used, capitalize=False)
    return ToyWorld(
        seed=seed,
        train_subjects=subjects[: n_subjects - n_probe],
        probe_subjects=subjects[n_subjects - n_probe :],
        cities=cities,
        currencies=currencies,
        capital={s: rng.choice(cities) for s in subjects},
        currency={s: rng.choice(currencies) for s in subjects},
    )


def default_world() -> ToyWorld:
    """The world of ``tiny/locft-toy``: ``make_world(**DEFAULT_WORLD)``."""
    return make_world(**DEFAULT_WORLD)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def build_word_tokenizer(
    world: ToyWorld, *, padding_side: Literal["left", "right"] = "left"
) -> PreTrainedTokenizerFast:
    """Closed word-level tokenizer over ``world.vocabulary()``.

    A ``tokenizers`` ``WordLevel`` model with a ``WhitespaceSplit`` pre-tokenizer; ids 0-3 are ``[PAD]`` (pad),
    ``[UNK]`` (unk), ``<s>`` (bos) and ``</s>`` (eos). A ``TemplateProcessing`` post-processor puts ``<s>`` in front of
    every encoded text when ``add_special_tokens=True`` (the default) and never appends ``</s>``, so a prompt encodes
    as ``<s> prompt``. Targets are encoded with ``add_special_tokens=False``. Whitespace only separates words, so
    ``" " + target`` encodes to exactly the target's word(s) (``" port Kelo"`` -> ``["port", "Kelo"]``, the same ids
    as ``"port Kelo"``) and ``prompt + " " + target`` to the prompt's ids followed by the target's: a collate that
    prepends a space to the target (the SentencePiece / BPE convention) works unchanged. Decoding joins the words with
    single spaces. Unknown words map to ``[UNK]``.

    Args:
        world: The world whose vocabulary to cover.
        padding_side: Padding side (``"left"`` suits batched generation and the edit collate).

    Returns:
        The tokenizer (a ``TokenizersBackend`` in transformers 5; ``AutoTokenizer`` reloads it as the same class).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
        model_max_length=64,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainReport:
    """What :func:`pretrain_toy_lm` measured (accuracies are greedy exact match, in [0, 1])."""

    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Wall time of :func:`pretrain_toy_lm` (model creation, training and checks)."""
    num_parameters: int
    """Number of model parameters."""
    trained_accuracy: float
    """Accuracy on every trained fact (1.0, or :func:`pretrain_toy_lm` raises)."""
    min_margin: float
    """Smallest teacher-forced logit margin over the trained answer tokens (see :func:`fact_margins`)."""
    probe_paraphrase_accuracy: float
    """Accuracy on template B of the probe subjects, never trained (paraphrase generalization)."""


def encode_facts(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> prompt answer </s>`` sequences with labels on the answer and ``</s>`` only.

    Args:
        tokenizer: The word-level tokenizer.
        pairs: (prompt, answer) pairs.

    Returns:
        ``input_ids`` (N, T), ``attention_mask`` (N, T) and ``labels`` (N, T), -100 on ``<s>``, the prompt and the
        padding.
    """
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], eos]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask, labels


@torch.no_grad()
def fact_margins(
    model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per-sequence smallest teacher-forced logit margin over the labelled tokens (answer and ``</s>``).

    The margin of a token is its logit minus the largest other logit: positive iff it is the argmax. A sequence with a
    positive margin is answered correctly by greedy decoding from ``<s> prompt`` until ``</s>`` (exact match): every
    greedy step sees the same prefix as teacher forcing as long as all earlier steps were right.

    Args:
        model: The causal LM.
        input_ids: (N, T) right-padded sequences from :func:`encode_facts`.
        attention_mask: (N, T).
        labels: (N, T), -100 where not scored.

    Returns:
        (N,) float, the minimum margin over each sequence's labelled tokens (``inf`` if none is labelled).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (N, T-1, V)
    target = labels[:, 1:]  # (N, T-1)
    scored = target != -100  # (N, T-1)
    index = target.clamp(min=0).unsqueeze(-1)  # (N, T-1, 1)
    gold = logits.gather(-1, index).squeeze(-1)  # (N, T-1)
    best_other = logits.scatter(-1, index, float("-inf")).amax(-1)  # (N, T-1)
    return (gold - best_other).masked_fill(~scored, float("inf")).amin(-1)  # (N,)


def fact_accuracy(
    model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> float:
    """Greedy exact-match accuracy of ``<s> prompt`` -> ``answer </s>``, through :func:`fact_margins` (> 0).

    Args:
        model: The causal LM.
        input_ids: (N, T) right-padded sequences from :func:`encode_facts`.
        attention_mask: (N, T).
        labels: (N, T), -100 where not scored.

    Returns:
        The fraction of sequences answered exactly (``nan`` for N = 0).
    """
    if input_ids.shape[0] == 0:
        return float("nan")
    return (fact_margins(model, input_ids, attention_mask, labels) > 0).float().mean().item()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread (deterministic reductions), restoring the caller's thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10 % at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def toy_config(tokenizer: PreTrainedTokenizerFast, dims: dict[str, Any]) -> LlamaConfig:
    """Llama config of the toy LM: ``dims`` (hidden / intermediate sizes, layers, heads), untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )


def pretrain_toy_lm(
    world: ToyWorld,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    hidden_size: int = DEFAULT_PRETRAIN["hidden_size"],
    intermediate_size: int = DEFAULT_PRETRAIN["intermediate_size"],
    num_hidden_layers: int = DEFAULT_PRETRAIN["num_hidden_layers"],
    num_attention_heads: int = DEFAULT_PRETRAIN["num_attention_heads"],
    lr: float = DEFAULT_PRETRAIN["lr"],
    batch_size: int = DEFAULT_PRETRAIN["batch_size"],
    max_steps: int = DEFAULT_PRETRAIN["max_steps"],
    min_margin: float = DEFAULT_PRETRAIN["min_margin"],
    eval_every: int = 25,
    seed: int = DEFAULT_PRETRAIN["seed"],
) -> tuple[LlamaForCausalLM, PretrainReport]:
    """Pre-train a tiny ``LlamaForCausalLM`` on the world's trained facts until it answers all of them greedily.

    - Data: ``<s> prompt answer </s>`` for ``world.facts("trained")`` (templates A, B, C of the train subjects, A and
      C of the probe subjects); the cross-entropy covers the answer and ``</s>`` only.
    - Model: untied embeddings, as many KV heads as heads, 64 positions, random init from ``seed``.
    - Optimisation: AdamW (weight decay 0.01, betas 0.9 / 0.98), ``batch_size`` facts per step drawn by seeded
      epoch-wise shuffling, linear warmup over 5 % of ``max_steps``, then cosine decay to 10 % at ``max_steps``.
    - Stop: every ``eval_every`` steps all trained facts are scored with :func:`fact_margins`; training stops once
      every fact's margin is at least ``min_margin`` (so 100 % greedy accuracy, robust to the last-bit differences
      between batched and single-prompt forward passes).

    Runs on CPU with one thread inside a forked RNG, so the result is deterministic and the caller's RNG and thread
    count are left as they were.

    Args:
        world: The world.
        tokenizer: Its tokenizer; built with :func:`build_word_tokenizer` when None.
        hidden_size: Model width.
        intermediate_size: MLP width.
        num_hidden_layers: Number of layers.
        num_attention_heads: Number of attention heads (and KV heads).
        lr: Peak learning rate.
        batch_size: Facts per step (capped at the number of facts).
        max_steps: Step budget.
        min_margin: Logit margin every trained answer token must reach (> 0).
        eval_every: Steps between checks.
        seed: Seed of the initialisation and the data order.

    Returns:
        The trained model (eval mode) and a :class:`PretrainReport`.

    Raises:
        RuntimeError: If the trained facts do not all reach ``min_margin`` within ``max_steps``.
    """
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    tokenizer = build_word_tokenizer(world) if tokenizer is None else tokenizer
    dims: dict[str, Any] = {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
    }
    data = encode_facts(tokenizer, world.facts("trained"))
    n, batch_size = data[0].shape[0], min(batch_size, data[0].shape[0])
    with _one_thread(), _seeded(seed):
        model = LlamaForCausalLM(toy_config(tokenizer, dims))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        warmup = max(1, max_steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, max_steps))
        order = torch.empty(0, dtype=torch.long)
        step, margin = 0, float("-inf")
        while step < max_steps and margin < min_margin:
            model.train()
            for _ in range(min(eval_every, max_steps - step)):
                if order.numel() < batch_size:
                    order = torch.cat([order, torch.randperm(n)])
                idx, order = order[:batch_size], order[batch_size:]
                model(input_ids=data[0][idx], attention_mask=data[1][idx], labels=data[2][idx]).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
            model.eval()
            margins = fact_margins(model, *data)  # (N,)
            margin = margins.min().item()
        accuracy = (margins > 0).float().mean().item()
        probe_accuracy = fact_accuracy(model, *encode_facts(tokenizer, world.facts("probe_paraphrase")))
    if margin < min_margin:
        raise RuntimeError(
            f"toy pre-training reached {accuracy:.1%} greedy accuracy (min margin {margin:.2f} < {min_margin}) "
            f"on the trained facts after {step} steps; raise max_steps or lr"
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    report = PretrainReport(
        steps=step,
        seconds=time.perf_counter() - start,
        num_parameters=sum(p.numel() for p in model.parameters()),
        trained_accuracy=accuracy,
        min_margin=margin,
        probe_paraphrase_accuracy=probe_accuracy,
    )
    return model, report


# ----------------------------------------------------------------------------------------------------------------------
# Builder and edits
# ----------------------------------------------------------------------------------------------------------------------


def build_tiny_locft_toy(folder: str | Path) -> Path:
    """Build the default toy world, pre-train the tiny Llama on it and save everything into ``folder``.

    Writes the model (``save_pretrained``: ``config.json``, ``generation_config.json``, ``model.safetensors``), the
    word-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``), :data:`WORLD_FILE` (the facts,
    :meth:`ToyWorld.save`) and :data:`REPORT_FILE` (the :class:`PretrainReport` without its wall time, so that two
    builds are byte-identical). Registered as ``tiny/locft-toy``; it takes about 5-10 s on one CPU thread.

    Args:
        folder: Output folder (created if missing).

    Returns:
        ``folder``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    path = _as_dir(folder)
    world = default_world()
    tokenizer = build_word_tokenizer(world)
    model, report = pretrain_toy_lm(world, tokenizer, **DEFAULT_PRETRAIN)
    _save_model(model, path)
    tokenizer.save_pretrained(path)
    world.save(path / WORLD_FILE)
    measured = {k: v for k, v in asdict(report).items() if k != "seconds"}  # keep the build byte-for-byte reproducible
    (path / REPORT_FILE).write_text(json.dumps(measured, indent=1) + "\n")
    return path


def edit_requests(world: ToyWorld, n_edits: int, seed: int = 0) -> list[dict[str, Any]]:
    """Counterfactual capital edits of distinct train subjects, in the LocFT processed JSON format.

    Each record has ``case_id``, ``prompt`` (template A), ``target_new`` (a random city other than the true one),
    ``ground_truth`` (the true capital), ``subject``, ``rephrase_prompt`` (template B) and ``locality_prompt`` /
    ``locality_ground_truth``: template A of an *unedited* train subject (probe subjects only when every train subject
    is edited) and its true capital. Locality subjects are drawn without replacement, then cycled.

    Args:
        world: The world.
        n_edits: Number of edits (at most the number of train subjects).
        seed: Seed of the draw (independent of the world's seed).

    Returns:
        The records, in a random (seeded) order.
    """
    if not 0 < n_edits <= len(world.train_subjects):
        raise ValueError(f"n_edits must be in [1, {len(world.train_subjects)}], got {n_edits}")
    rng = random.Random(seed)
    edited = rng.sample(world.train_subjects, n_edits)
    chosen = set(edited)
    unedited = [s for s in world.train_subjects if s not in chosen] or world.probe_subjects
    unedited = rng.sample(unedited, len(unedited))  # a seeded shuffle
    records = []
    for i, subject in enumerate(edited):
        truth = world.capital[subject]
        other = unedited[i % len(unedited)]
        records.append(
            {
                "case_id": i,
                "prompt": world.prompt(TEMPLATE_EDIT, subject),
                "target_new": rng.choice([c for c in world.cities if c != truth]),
                "ground_truth": truth,
                "subject": subject,
                "rephrase_prompt": world.prompt(TEMPLATE_PARAPHRASE, subject),
                "locality_prompt": world.prompt(TEMPLATE_EDIT, other),
                "locality_ground_truth": world.capital[other],
            }
        )
    return records
