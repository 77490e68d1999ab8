"""Model soups on three tiny fine-tuned SFT checkpoints: uniform, greedy (never worse than the best), learned, CLI."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from safetensors.torch import load_file
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from ftmods.datamodules import ChatDataModule
from ftmods.sft import SFTModule
from ftmods.soup import (
    LearnedSoupModule,
    greedy_soup,
    load_ingredient,
    load_into,
    main,
    save_state_dict,
    uniform_soup,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
TINY = "tiny/causal-lm"


def _datamodule(seed: int = 0) -> ChatDataModule:
    return ChatDataModule([str(DATA / "sft_tiny_chat.jsonl")], str(DATA / "sft_tiny_val.jsonl"), tokenizer=TINY,
                          batch_size=8, max_length=96, seed=seed)  # fmt: skip


def _trainer(root: Path, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> list[Path]:
    """Three fine-tunes of the same tiny model (seeds 1-3: data order; learning rates 1e-3, 3e-3, 1e-2), 4 steps
    each, saved as Lightning checkpoints; the first also as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("ingredients")
    paths = []
    for seed, lr in ((1, 1e-3), (2, 3e-3), (3, 1e-2)):
        seed_everything(seed)
        module = SFTModule(TINY, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
        trainer = _trainer(root, max_steps=4, limit_val_batches=0)
        trainer.fit(module, datamodule=_datamodule(seed))
        trainer.save_checkpoint(root / f"seed{seed}.ckpt")
        paths.append(root / f"seed{seed}.ckpt")
        if seed == 1:
            module.save_pretrained(root / "seed1_hf")
    return paths


@pytest.fixture(scope="module")
def evaluate(tmp_path_factory):
    """Held-out token NLL (``val/loss``, lower is better) of a state dict, via the module's own validation."""
    module = SFTModule(TINY)
    module.configure_model()
    trainer = _trainer(tmp_path_factory.mktemp("eval"))
    datamodule = _datamodule()

    def score(state_dict) -> float:
        load_into(module, state_dict)
        return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]

    return score


def test_uniform_soup_is_the_elementwise_mean(ingredients):
    states = [load_ingredient(p) for p in ingredients]
    soup = uniform_soup(ingredients)  # streamed from the paths
    assert soup.keys() == states[0].keys()
    for name, value in soup.items():
        assert_close(value, (states[0][name] + states[1][name] + states[2][name]) / 3, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(states[0][n], states[1][n]) for n in soup)  # the ingredients really differ


def test_uniform_soup_keeps_integer_buffers_and_refuses_other_architectures():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16), "n": torch.tensor(7)}
    soup = uniform_soup([a, b])
    assert soup["w"].dtype == torch.bfloat16
    assert soup["w"].tolist() == [2.0, 3.0]
    assert soup["n"].item() == 3  # from the first ingredient
    with pytest.raises(ValueError, match="different keys"):
        uniform_soup([a, {"w": b["w"]}])
    with pytest.raises(ValueError, match="different shapes"):
        uniform_soup([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


def test_greedy_soup_by_construction():
    """Scores are -|w - 2| for ingredients w = 5, 1, 3, -2. Alone: 1 and 3 tie at -1 (the stable sort keeps 1 first),
    5 scores -3, -2 scores -4. Soup {1}; + 3 → mean 2 (score 0, kept); + 5 → mean 3 (-1, dropped); + -2 → mean 2/3
    (-4/3, dropped)."""
    sds = [{"w": torch.tensor([x])} for x in (5.0, 1.0, 3.0, -2.0)]
    calls = []

    def score(sd, target=2.0):
        calls.append(float(sd["w"]))
        return -abs(float(sd["w"]) - target)

    soup = greedy_soup(sds, score)
    assert soup.kept == [1, 2]
    assert soup.soup_score == 0.0
    assert float(soup.state_dict["w"]) == 2.0
    assert [(i, a) for i, _, a in soup.history] == [(2, True), (0, False), (3, False)]
    assert len(calls) == 4 + 3  # every ingredient alone, then one trial per ingredient after the best

    # ties: two identical ingredients give the same soup score; "ge" keeps the second, "gt" does not
    same = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    assert greedy_soup(same, score, accept="ge").kept == [0, 1]
    assert greedy_soup(same, score, accept="gt").kept == [0]
    # minimisation, precomputed scores (no evaluation of the ingredients alone), and a NaN trial is refused
    losses = greedy_soup(sds, lambda sd: abs(float(sd["w"]) - 2.0), mode="min", scores=[3.0, 1.0, 1.0, 4.0])
    assert losses.kept == [1, 2]
    nan = greedy_soup(sds[:2], lambda sd: float("nan"), scores=[0.0, 1.0])
    assert nan.kept == [1]
    assert nan.soup_score == 1.0


def test_greedy_soup_is_never_worse_than_the_best_ingredient_on_heldout(ingredients, evaluate):
    soup = greedy_soup(ingredients, evaluate, mode="min")
    best = min(soup.scores)
    assert soup.kept[0] == soup.scores.index(best)
    assert soup.soup_score <= best
    assert evaluate(soup.state_dict) == soup.soup_score  # the returned soup is the one that was scored
    assert len(soup.history) == 2


def test_ingredient_formats_agree(ingredients, tmp_path):
    """A Lightning checkpoint, the same model's save_pretrained folder (keys under 'model.', tied head written once)
    and a safetensors file of the state dict give the same weights; ShardedEMA's shadow is split off."""
    lightning = load_ingredient(ingredients[0])
    hf = load_ingredient(ingredients[0].parent / "seed1_hf", hf_prefix="model.")
    assert set(lightning) - set(hf) == {"model.lm_head.weight"}  # tied to the embeddings: saved once
    assert set(hf) <= set(lightning)
    for name, value in hf.items():
        assert torch.equal(value, lightning[name]), name
    save_state_dict(lightning, tmp_path / "sd.safetensors")  # tied tensors share storage: written as copies
    assert load_ingredient(tmp_path / "sd.safetensors").keys() == lightning.keys()

    with_ema = {**lightning, "ema_shadow.model.lm_head.weight": torch.zeros_like(lightning["model.lm_head.weight"])}
    torch.save({"state_dict": with_ema}, tmp_path / "ema.ckpt")
    assert load_ingredient(tmp_path / "ema.ckpt").keys() == lightning.keys()
    assert load_ingredient(tmp_path / "ema.ckpt", weights="ema")["model.lm_head.weight"].abs().sum() == 0
    assert "ema_shadow.model.lm_head.weight" in load_ingredient(tmp_path / "ema.ckpt", weights="all")
    with pytest.raises(KeyError, match="current_model_state"):
        load_ingredient(ingredients[0], key="current_model_state")


def test_learned_soup_on_sft_checkpoints(ingredients, evaluate, tmp_path):
    """Per-layer mixing weights, uniform at the start, trained on the held-out set: the soup's held-out loss does
    not end above the uniform soup's (where training starts), and every row is a distribution over the 3 models."""
    seed_everything(0)
    soup = LearnedSoupModule(SFTModule(TINY), [str(p) for p in ingredients], granularity="layer")
    heldout = _datamodule()
    heldout.setup("validate")
    _trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(soup, train_dataloaders=heldout.val_dataloader())
    weights = soup.mixing_weights()
    assert weights.shape == (len(soup.names), 3)
    assert_close(weights.sum(-1), torch.ones(len(soup.names)))
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 3))
    learned, uniform = evaluate(soup.souped_state_dict()), evaluate(uniform_soup(ingredients))
    assert learned <= uniform + 1e-6
    state = soup.souped_state_dict()
    assert torch.equal(state["model.lm_head.weight"], state["model.model.embed_tokens.weight"])  # tied stays tied


class Classifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def test_learned_soup_of_classifiers_learns_the_logit_scale(tmp_path):
    """No compute_loss: cross-entropy of beta * logits; one weight per model. Three 'fine-tunes' of one
    initialisation with different seeds; training on held-out data lowers the loss and moves beta."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    base = Classifier()
    paths = []
    for seed in range(3):
        model = Classifier()
        model.load_state_dict(base.state_dict())
        torch.manual_seed(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        for _ in range(30):
            idx = torch.randint(0, 192, (32,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        torch.save({"state_dict": model.state_dict()}, tmp_path / f"m{seed}.ckpt")
        paths.append(str(tmp_path / f"m{seed}.ckpt"))
    soup = LearnedSoupModule(Classifier(), paths)
    soup.configure_model()
    heldout = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=16, shuffle=True)
    with torch.no_grad():
        before = sum(float(soup.heldout_loss(b)) for b in heldout)
    _trainer(tmp_path, max_epochs=5).fit(soup, train_dataloaders=heldout)
    with torch.no_grad():
        after = sum(float(soup.heldout_loss(b)) for b in heldout)
    assert after < before
    assert soup.mixing_weights().shape == (1, 3)
    assert soup.logit_scale.item() != 1.0
    with pytest.raises(ValueError, match="two"):
        LearnedSoupModule(Classifier(), paths[:1])


EVAL_ARGS = ["--eval-config", "configs/sft/tiny.yaml", "--model.init_args.sample_completions", "0"]


def test_cli_greedy_writes_the_soup_and_its_metrics(ingredients, evaluate, in_sandbox):
    """Formats may mix: the Hugging Face copy of the first ingredient (its tied head saved once) joins the three."""
    paths = [*map(str, ingredients), str(ingredients[0].parent / "seed1_hf")]
    record = main(["--method", "greedy", "--ingredients", *paths, "--output", "soup", *EVAL_ARGS])
    written = json.loads((in_sandbox / "soup/metrics.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert [i["path"] for i in written["ingredients"]] == paths
    assert written["ingredients"][0]["score"] == written["ingredients"][3]["score"]  # the same model twice
    assert written["soup"]["score"] <= written["best_ingredient"]["score"]
    assert [i["path"] for i in written["ingredients"] if i["kept"]][0] == written["best_ingredient"]["path"]
    soup = load_file(in_sandbox / "soup/soup.safetensors")
    fresh = SFTModule(TINY)
    fresh.configure_model()
    fresh.load_state_dict(soup)  # strict: the module's whole state dict
    assert evaluate(soup) == pytest.approx(written["soup"]["score"], rel=1e-6)
    assert (in_sandbox / "soup/pretrained/model.safetensors").is_file()  # a Hugging Face folder too


def test_cli_learned_soup(ingredients, in_sandbox):
    args = ["--method", "learned", "--learned-epochs", "1", "--ingredients", *map(str, ingredients[:2])]
    record = main([*args, "--output", "learned", *EVAL_ARGS])
    assert len(record["mixing_weights"]) == 1
    assert sum(record["mixing_weights"][0]) == pytest.approx(1.0)
    assert all(i["kept"] for i in record["ingredients"])
    assert (in_sandbox / "learned/soup.safetensors").is_file()
