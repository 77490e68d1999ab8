"""Two "nodes" on one machine: two torchrun launches (``--nnodes 2 --nproc-per-node 1``, one per node rank) of the
same CLI command with ``configs/strategy/multinode.yaml``, as on a real cluster; the ranks rendezvous over TCP, train
with DDP (gloo) and end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_node_torchrun_launch(in_sandbox):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    command = [
        "-c", "configs/sft/tiny.yaml", "-c", "configs/strategy/ddp.yaml", "-c", "configs/strategy/multinode.yaml",
        "--trainer.devices", "1", "--trainer.accelerator", "cpu", "--trainer.max_steps", "4",
        "--trainer.callbacks+=support.rank_digest.RankDigest", "--trainer.callbacks.dirpath", "digests",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(REPO / "cli.py"),
                "fit",
                *command,
            ],
            cwd=in_sandbox,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    ranks = [json.loads((in_sandbox / "digests" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # node 1 holds global rank 1 (num_nodes 2 x devices 1)
