"""EditEvaluator on the tiny offline causal LM (random weights: it answers with repeated tokens, which is enough)."""

import copy
import dataclasses
import math

import pytest
import torch

from ftmods.datamodules.edits import EditRequest
from ftmods.locft.evaluator import QA_INST_TEMPLATE, EditEvaluator, protocol_keys
from ftmods.locft.metrics import ProtocolScores, summarize
from ftmods.models.loading import load_causal_lm, load_tokenizer

PROMPTS = [
    "What is 3 + 4?",
    "This movie was",
    "The answer is",
    "a photo of a",
    "def add(a, b):",
    "Let me think step by step",
    "Translate to French: hello ->",
    "Input: the food was terrible",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny/causal-lm")


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("tiny/causal-lm").eval()


def _requests() -> list[EditRequest]:
    """Three requests of different lengths; the last has no rephrase, locality, portability or ground truth."""
    return [
        EditRequest(
            "What is 3 + 4?",
            "7",
            ground_truth="8",
            rephrase=["Question: what is 3 + 4?", "3 + 4 ="],
            locality=[(PROMPTS[2], "cat"), (PROMPTS[3], "dog")],
            portability=[("Translate to French: hello ->", "bonjour")],
        ),
        EditRequest(
            "This movie was",
            "great fun",
            ground_truth="terrible",
            rephrase=["The film was"],
            locality=[(PROMPTS[4], "return a + b"), (PROMPTS[5], "ok"), (PROMPTS[7], "Output: negative")],
        ),
        EditRequest("Let me think", "step by step"),
    ]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with Gaussian noise (std 1) added to one weight matrix: an 'edit' that breaks locality."""
    edited = copy.deepcopy(model)
    weight = edited.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return edited


def test_keys_are_protocol_tagged_and_nan_marks_missing_prompts(model, tokenizer):
    protocols = ("wild_em", "teacher_forced_token", "counterfact_prob")
    evaluator = EditEvaluator(tokenizer, protocols, max_new_tokens=4, batch_size=4)
    requests = _requests()
    scores = evaluator.evaluate(model, requests)  # no reference: locality keys are left out
    assert set(scores) == {k for k in protocol_keys(protocols) if not k.endswith("/locality")}
    assert set(evaluator.keys) == set(protocol_keys(protocols))
    for key, values in scores.items():
        assert key.split("/")[0] in protocols
        assert values.shape == (3,)
        assert not values[0].isnan(), key  # request 0 has every kind of prompt
    for key in ("wild_em/generalization", "teacher_forced_token/portability", "teacher_forced_token/specificity"):
        assert scores[key][2].isnan()  # request 2 has no such prompt
    assert not scores["wild_em/reliability"].isnan().any()
    assert scores["counterfact_prob/efficacy"][2].isnan()  # no ground truth
    assert scores["wild_em/portability"][1].isnan()
    summary = evaluator.summarize(scores)
    assert set(summary) == set(scores)
    assert not math.isnan(summary["wild_em/portability"])


def test_same_model_as_reference_gives_locality_one(model, tokenizer):
    evaluator = EditEvaluator(tokenizer, ("wild_em", "teacher_forced_token"), max_new_tokens=8, batch_size=4)
    requests = _requests()
    reference = evaluator.reference(model, requests)
    assert len(reference["wild_generations"]) == len(reference["teacher_forced_argmax"]) == 5
    scores = evaluator.evaluate(model, requests, reference=reference)
    for key in ("wild_em/locality", "teacher_forced_token/locality"):
        assert scores[key][:2].tolist() == [1.0, 1.0], key
        assert scores[key][2].isnan()  # request 2 has no locality prompt


def test_perturbed_model_breaks_locality_on_some_prompts(model, tokenizer):
    evaluator = EditEvaluator(tokenizer, ("wild_em", "teacher_forced_token"), max_new_tokens=8, batch_size=4)
    requests = [EditRequest("What is 3 + 4?", "7", locality=[(p, "cat") for p in PROMPTS])]
    reference = evaluator.reference(model, requests)
    scores = evaluator.evaluate(_perturbed(model), requests, reference=reference)
    assert scores["wild_em/locality"].item() < 1.0
    assert scores["teacher_forced_token/locality"].item() < 1.0


def test_teacher_forced_reliability_matches_a_manual_computation(model, tokenizer):
    """Request 1 ("This movie was" -> "great fun"), scored in a left-padded batch with the longer requests.

    Manually: ids = prompt ids + ids(" great fun") + [eos], one unpadded forward; the logits at positions
    P-1 .. T-2 predict the target tokens; accuracy = mean(argmax == target).
    """
    requests = _requests()
    evaluator = EditEvaluator(tokenizer, ("teacher_forced_token",), batch_size=8)
    scores = evaluator.evaluate(model, requests)
    prompt = tokenizer("This movie was")["input_ids"]
    target = [*tokenizer(" great fun", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target])).logits[0]  # (T, V)
    predicted = logits[len(prompt) - 1 : -1].argmax(-1)  # (L,)
    manual = (predicted == torch.tensor(target)).float().mean()
    torch.testing.assert_close(scores["teacher_forced_token/reliability"][1], manual)
    # Batch composition and padding do not change the scores (explicit position ids under left padding).
    single = EditEvaluator(tokenizer, ("teacher_forced_token",), batch_size=1).evaluate(model, requests)
    for key, values in scores.items():
        torch.testing.assert_close(single[key], values, equal_nan=True)


def test_teacher_forced_reliability_is_one_for_the_model_s_own_argmax_chain(model, tokenizer):
    """Invariant: a target made of the model's own greedy tokens, without EOS, has token accuracy 1."""
    evaluator = EditEvaluator(tokenizer, ("teacher_forced_token",), append_eos=False)
    prompt = "Input: the food was terrible"
    answer = evaluator.generate(model, [prompt])[0]  # " terrible terrible ..." (no stop string)
    assert answer.strip()
    scores = evaluator.evaluate(model, [EditRequest(prompt, answer.strip())])
    assert scores["teacher_forced_token/reliability"].item() == 1.0


def test_wild_em_is_one_when_the_target_is_the_model_s_own_answer(model, tokenizer):
    """Targets are the model's own greedy, stop-truncated answers, so EM must be 1; rephrase = the prompt itself."""
    evaluator = EditEvaluator(tokenizer, ("wild_em",), max_new_tokens=6, batch_size=16)
    answers = evaluator.generate(model, PROMPTS)
    assert any(normalized.strip() for normalized in answers)
    requests = [EditRequest(p, a, rephrase=[p]) for p, a in zip(PROMPTS, answers, strict=True)]
    scores = evaluator.evaluate(model, requests)
    assert scores["wild_em/reliability"].tolist() == [1.0] * len(PROMPTS)
    assert scores["wild_em/generalization"].tolist() == [1.0] * len(PROMPTS)
    wrong = [EditRequest(p, "zebra") for p in PROMPTS]
    assert evaluator.evaluate(model, wrong)["wild_em/reliability"].sum().item() == 0.0


def test_wild_judge_is_pluggable(model, tokenizer):
    calls = []

    def judge(question: str, prediction: str, golds: list[str]) -> bool:
        calls.append((question, prediction, golds))
        return question.startswith("What")

    with pytest.raises(ValueError, match="judge"):
        EditEvaluator(tokenizer, ("wild_judge",))
    evaluator = EditEvaluator(tokenizer, ("wild_em", "wild_judge"), judge=judge, max_new_tokens=4)
    scores = evaluator.evaluate(model, _requests())
    assert scores["wild_judge/reliability"].tolist() == [1.0, 0.0, 0.0]
    assert ("What is 3 + 4?", evaluator.generate(model, ["What is 3 + 4?"])[0], ["7"]) in calls
    assert "wild_em/reliability" in scores  # both protocols from the same generations


def test_counterfact_prob_flips_when_new_and_true_swap(model, tokenizer):
    """Invariant: swapping target_new and ground_truth flips efficacy and paraphrase and negates the magnitudes."""
    evaluator = EditEvaluator(tokenizer, ("counterfact_prob",))
    requests = _requests()[:2]
    swapped = [dataclasses.replace(r, target_new=r.ground_truth, ground_truth=r.target_new) for r in requests]
    scores, flipped = evaluator.evaluate(model, requests), evaluator.evaluate(model, swapped)
    for metric in ("efficacy", "paraphrase"):
        key = f"counterfact_prob/{metric}"
        torch.testing.assert_close(scores[key] + flipped[key], torch.ones(2))  # no exact ties on this model
        torch.testing.assert_close(scores[f"{key}_magnitude"], -flipped[f"{key}_magnitude"])
    # Neighbourhood: true = the locality answer, new = target_new. Equal strings tie: not a success, magnitude 0.
    tied = [dataclasses.replace(r, locality=[(q, r.target_new) for q, _ in r.locality]) for r in requests]
    tied_scores = evaluator.evaluate(model, tied)
    assert tied_scores["counterfact_prob/neighborhood"].tolist() == [0.0, 0.0]
    assert tied_scores["counterfact_prob/neighborhood_magnitude"].tolist() == [0.0, 0.0]


def test_train_mode_is_restored(model, tokenizer):
    evaluator = EditEvaluator(tokenizer, ("wild_em", "teacher_forced_token"), max_new_tokens=2)
    model.train()
    try:
        evaluator.evaluate(model, _requests()[:1], reference=evaluator.reference(model, _requests()[:1]))
        assert model.training
    finally:
        model.eval()
    evaluator.evaluate(model, _requests()[:1])
    assert not model.training


def test_prompt_formats(tokenizer):
    assert EditEvaluator(tokenizer, prompt_format="raw").format_prompt("Who?") == "Who?"
    assert EditEvaluator(tokenizer, prompt_format="qa_inst").format_prompt("Who?") == QA_INST_TEMPLATE.format(
        question="Who?"
    )
    assert QA_INST_TEMPLATE.format(question="Who?") == "Please answer the question:\n\nQ: Who?\nA:"
    chat = EditEvaluator(tokenizer, prompt_format="chat_template").format_prompt("Who?")
    assert "<|im_start|>user\nWho?<|im_end|>" in chat
    assert chat.endswith("<|im_start|>assistant\n")


def test_reference_must_match_the_requests(model, tokenizer):
    evaluator = EditEvaluator(tokenizer, ("wild_em",), max_new_tokens=2)
    reference = evaluator.reference(model, _requests()[:1])
    with pytest.raises(ValueError, match="other requests"):
        evaluator.evaluate(model, _requests()[1:], reference=reference)
    with pytest.raises(ValueError, match="protocols"):
        EditEvaluator(tokenizer, ("rome",))  # type: ignore[arg-type]


def test_scores_accumulate_over_request_batches(model, tokenizer):
    """ProtocolScores over two halves of the requests equals summarize over all of them."""
    evaluator = EditEvaluator(tokenizer, ("wild_em", "teacher_forced_token"), max_new_tokens=4)
    requests = _requests()
    metric = ProtocolScores(evaluator.keys)
    for part in (requests[:1], requests[1:]):
        metric.update(evaluator.evaluate(model, part, reference=evaluator.reference(model, part)))
    expected = summarize(evaluator.evaluate(model, requests, reference=evaluator.reference(model, requests)))
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(expected[key], nan_ok=True), key
