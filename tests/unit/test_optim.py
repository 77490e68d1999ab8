import math

import pytest
import torch

from ftmods.optim import WarmupCosineLR


def _lrs(**kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, **kwargs)
    out = []
    for _ in range(kwargs["total_steps"] + 2):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_by_hand():
    """warmup 3: (s+1)/4 = 0.25, 0.5, 0.75; then cosine over 4 steps: 1, (1+cos(pi/4))/2, 0.5, (1-cos(pi/4))/2, 0."""
    lrs = _lrs(warmup_steps=3, total_steps=7)
    c = math.cos(math.pi / 4)
    assert lrs[:8] == pytest.approx([0.25, 0.5, 0.75, 1.0, (1 + c) / 2, 0.5, (1 - c) / 2, 0.0])
    assert lrs[8] == 0.0  # stays at the minimum


def test_min_ratio_and_linear():
    assert _lrs(warmup_steps=0, total_steps=4, min_lr_ratio=0.2, decay="linear")[:5] == pytest.approx(
        [1.0, 0.8, 0.6, 0.4, 0.2]
    )


def test_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(opt, warmup_steps=5, total_steps=5)
    with pytest.raises(ValueError, match="decay"):
        WarmupCosineLR(opt, decay="step")


def test_state_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = WarmupCosineLR(opt2, warmup_steps=2, total_steps=10)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
