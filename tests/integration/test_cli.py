"""The LightningCLI: every shipped YAML parses, tiny configs run, strategies compose, evaluation warns."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from ftmods.cli import FtmodsCLI, fill_shared_arguments

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = ("strategy", "callbacks")  # composable pieces, parsed on top of a method config below
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name not in SNIPPETS)
STRATEGIES = sorted((REPO / "configs" / "strategy").glob("*.yaml"))
CALLBACKS = sorted((REPO / "configs" / "callbacks").glob("*.yaml"))
TINY = sorted((REPO / "configs").rglob("tiny.yaml"))


def _print_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        FtmodsCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["ftmods"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_method_config_parses_without_loading_weights(config):
    parsed = _print_config("-c", str(config))
    assert parsed["model"]["class_path"].startswith("ftmods.")
    assert parsed["data"]["class_path"].startswith("ftmods.datamodules.")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_strategy_snippets_compose_with_a_method_config(strategy):
    parsed = _print_config("-c", str(REPO / "configs/sft/tiny.yaml"), "-c", str(strategy))
    snippet = yaml.safe_load(strategy.read_text())["trainer"]
    for key, value in snippet.items():  # every setting of the snippet reaches the trainer
        if key == "strategy":
            assert parsed["trainer"]["strategy"]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= parsed["trainer"]["strategy"]["init_args"].items()
        else:
            assert parsed["trainer"][key] == value
    assert parsed["model"]["init_args"]["pretrained"] == "tiny/causal-lm"  # the method part is untouched


def _readme_commands() -> list[list[str]]:
    """The README's ``python cli.py <fit|validate|test|predict> ...`` lines, comments dropped."""
    commands = []
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("python cli.py "):
            words = shlex.split(line.rstrip("\\ "), comments=True)[2:]
            if words[0] in ("fit", "validate", "test", "predict") and "--print_config" not in words:
                commands.append(words)
    return commands


@pytest.mark.parametrize("command", _readme_commands(), ids=lambda c: " ".join(c)[:90])
def test_readme_commands_parse(command, monkeypatch):
    """Every CLI command the README shows composes and parses (run from the repository root, as written)."""
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        FtmodsCLI(args=[*command, "--print_config"])
    assert exit_info.value.code in (0, None)
    parsed = yaml.safe_load(out.getvalue())
    assert parsed["model"]["class_path"].startswith("ftmods.")


@pytest.mark.parametrize("snippet", CALLBACKS, ids=lambda p: p.stem)
def test_callback_snippets_append_to_a_method_config(snippet):
    """A callbacks snippet adds its callbacks after the method config's own (which are kept)."""
    base = _print_config("-c", str(REPO / "configs/sft/tiny.yaml"))["trainer"]["callbacks"]
    parsed = _print_config("-c", str(REPO / "configs/sft/tiny.yaml"), "-c", str(snippet))
    callbacks = parsed["trainer"]["callbacks"]
    assert callbacks[: len(base)] == base
    added = [c["class_path"] for c in callbacks[len(base) :]]
    assert added
    assert all(path.startswith("ftmods.callbacks.") for path in added)


def test_real_model_config_prints_offline_and_instantly():
    parsed = _print_config("-c", str(REPO / "configs/sft/qwen2.5-0.5b.yaml"))
    assert parsed["model"]["init_args"]["pretrained"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert parsed["trainer"]["precision"] == "bf16-true"


def test_misspelled_key_fails():
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        FtmodsCLI(args=["fit", "-c", str(REPO / "configs/sft/tiny.yaml"), "--model.init_args.learning_rte", "1"])
    assert "learning_rte" in err.getvalue()


@pytest.mark.parametrize("config", TINY, ids=lambda p: str(p.relative_to(REPO)))
def test_tiny_configs_run_fast_dev_run(config, in_sandbox):
    if "selection_file:" in config.read_text():  # S3FT: fit trains on what predict selected
        predicted = FtmodsCLI(args=["predict", "-c", str(config), "--trainer.fast_dev_run", "1"])
        assert predicted.trainer.state.finished
    cli = FtmodsCLI(args=["fit", "-c", str(config), "--trainer.fast_dev_run", "2"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2 // cli.trainer.accumulate_grad_batches  # 2 batches


def test_tokenizer_is_taken_from_the_model_when_null():
    config = Namespace(
        model=Namespace(class_path="m", init_args=Namespace(pretrained="org/model")),
        data=Namespace(class_path="d", init_args=Namespace(tokenizer=None, batch_size=2)),
    )
    fill_shared_arguments(config)
    assert config.data.init_args.tokenizer == "org/model"
    config.data.init_args.tokenizer = "other/tok"  # an explicit value is kept
    fill_shared_arguments(config)
    assert config.data.init_args.tokenizer == "other/tok"
    no_key = Namespace(model=Namespace(init_args=Namespace(x=1)), data=Namespace(init_args=Namespace(y=2)))
    fill_shared_arguments(no_key)  # modules / DataModules without the keys are left alone
    assert "tokenizer" not in no_key.data.init_args


def test_validate_without_checkpoint_warns_and_names_the_run_checkpoints(in_sandbox):
    ckpts = in_sandbox / "runs/sft_tiny/checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"")
    args = ["validate", "-c", "configs/sft/tiny.yaml", "--trainer.limit_val_batches", "1", "--trainer.logger", "false"]
    with pytest.warns(UserWarning, match=r"without --ckpt_path .*pretrained weights.*last\.ckpt"):
        FtmodsCLI(args=args)


def test_tiny_fit_from_the_command_line_writes_checkpoint_config_and_export(in_sandbox):
    """The README's first command, as a user runs it (a separate process, from a folder holding configs/)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "fit", "-c", "configs/sft/tiny.yaml"],
        cwd=in_sandbox,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = in_sandbox / "runs/sft_tiny"
    assert (run / "checkpoints/last.ckpt").is_file()
    assert (run / "pretrained/model.safetensors").is_file()
    saved = yaml.safe_load(next(run.rglob("config.yaml")).read_text())
    assert saved["data"]["init_args"]["tokenizer"] == "tiny/causal-lm"  # filled from the model, recorded
    samples = sorted(run.rglob("val_completions/step=*.jsonl"))
    assert [p.name for p in samples] == ["step=12.jsonl", "step=24.jsonl"]  # a table per validation, none at sanity
    rows = [yaml.safe_load(line) for line in samples[-1].read_text().splitlines()]
    assert len(rows) == 4
    assert set(rows[0]) == {"prompt", "reference", "completion"}
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")  # the generation prompt, the answer not leaked
    metrics = next(run.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    val = [float(r.split(",")[header.index("val/loss")]) for r in metrics[1:] if r.split(",")[header.index("val/loss")]]
    assert len(val) == 2
    assert val[1] < val[0]
