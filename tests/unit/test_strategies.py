"""Strategy presets: block classes for FSDP1 policies, and multi-node launchers detected through the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from torch import nn

from ftmods.cli import FtmodsCLI
from ftmods.models.loading import load_causal_lm
from ftmods.strategies import BlockFSDPStrategy, block_classes

REPO = Path(__file__).resolve().parents[2]


class _Holder(nn.Module):
    """A LightningModule-like wrapper: the transformers model sits one level down, as in every ftmods module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(2, 2)


def test_block_classes_of_a_wrapped_llama_and_a_unet():
    llama = _Holder(load_causal_lm("tiny/causal-lm"))
    assert {c.__name__ for c in block_classes(llama)} == {"LlamaDecoderLayer"}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)  # fmt: skip
    names = {c.__name__ for c in block_classes(_Holder(unet))}
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= names
    assert block_classes(nn.Sequential(nn.Linear(2, 2))) == set()


def test_block_fsdp_strategy_derives_wrap_and_checkpoint_policies():
    """FSDP1 itself needs CUDA; what can be checked here is the policy the strategy hands to FSDP and checkpointing."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    llama = _Holder(load_causal_lm("tiny/causal-lm"))
    strategy = BlockFSDPStrategy(checkpoint_blocks=True)
    classes = strategy.resolve_policies(llama)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert {c.__name__ for c in classes} == {"LlamaDecoderLayer"}
    assert set(policy._module_classes) == classes
    assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], ModuleWrapPolicy)

    explicit = BlockFSDPStrategy(auto_wrap_policy={nn.Linear})  # an explicit policy wins
    explicit.resolve_policies(llama)
    assert explicit.kwargs["auto_wrap_policy"]._module_classes == {nn.Linear}
    assert explicit._activation_checkpointing_kwargs == {}
    plain = BlockFSDPStrategy(wrap_blocks=False)
    plain.resolve_policies(llama)
    assert "auto_wrap_policy" not in plain.kwargs
    with pytest.warns(UserWarning, match="no block classes"):
        BlockFSDPStrategy().resolve_policies(nn.Linear(2, 2))


TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "16",
            "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}  # fmt: skip
SLURM = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_JOB_NAME": "ftmods", "SLURM_JOB_ID": "42",
         "SLURM_NODELIST": "node[1-2]"}  # fmt: skip


@pytest.mark.parametrize(("env", "kind"), [(TORCHRUN, TorchElasticEnvironment), (SLURM, SLURMEnvironment)])
def test_multinode_snippet_picks_up_the_launcher(monkeypatch, env, kind):
    """``configs/strategy/multinode.yaml`` (2 nodes x 8 devices) under torchrun / srun: Lightning's environment
    detection gives rank 9 of 16 on node 1, local rank 1, from the launcher's variables (no process group is
    started: the Trainer is only built)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["ftmods"])
    cli = FtmodsCLI(
        args=["-c", str(REPO / "configs/sft/tiny.yaml"), "-c", str(REPO / "configs/strategy/ddp.yaml"),
              "-c", str(REPO / "configs/strategy/multinode.yaml"), "--trainer.accelerator", "cpu",
              "--trainer.logger", "false"],
        run=False,
    )  # fmt: skip
    environment = cli.trainer.strategy.cluster_environment
    assert isinstance(environment, kind)
    assert (cli.trainer.num_nodes, cli.trainer.num_devices) == (2, 8)
    assert (cli.trainer.global_rank, cli.trainer.local_rank, cli.trainer.node_rank) == (9, 1, 1)
    assert cli.trainer.world_size == 16
