"""`training.loop.reschedule`: a run extended on resume (a larger --epochs) continues on the learning rates of a run
planned for the new total from the start, also when it resumes exactly at a milestone (unit level: scheduler state
as a checkpoint holds it, no training)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from momentum_proxy.training.loop import lr_milestones, make_scheduler, reschedule


def schedule(kind: str, epochs: int, rounding: str = "round"):
    """An optimizer (two groups, as training's) and its scheduler for a run planned for `epochs`."""
    cfg = SimpleNamespace(schedule=kind, epochs=epochs, milestone_rounding=rounding)
    optimizer = torch.optim.SGD(
        [
            {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1},
            {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.01},
        ],
        lr=0.1,
    )
    return cfg, optimizer, make_scheduler(cfg, optimizer)


def rates(optimizer, scheduler, first: int, last: int) -> list[list[float]]:
    """The rates epochs first..last train with (an epoch's rate is read before its scheduler step)."""
    out = []
    for _ in range(first, last + 1):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def extended(kind: str, planned: int, total: int, resumed_at: int, rounding: str = "round"):
    """Train `resumed_at` epochs of a run planned for `planned`, save, and resume with --epochs `total`."""
    _, optimizer, scheduler = schedule(kind, planned, rounding)
    rates(optimizer, scheduler, 1, resumed_at)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    cfg, optimizer, scheduler = schedule(kind, total, rounding)  # setup builds for the new total, then loads
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    reschedule(scheduler, cfg, resumed_at)
    return rates(optimizer, scheduler, resumed_at + 1, total)


@pytest.mark.parametrize(
    "kind, planned, total, rounding",
    [
        ("multistep", 6, 10, "round"),  # milestones 3, 5 -> 5, 8
        ("multistep", 7, 12, "floor"),  # 3, 5 -> 6, 9
        ("cosine", 6, 10, "round"),
    ],
)
def test_an_extended_run_trains_on_the_rates_of_the_longer_run_from_every_resume_epoch(kind, planned, total, rounding):
    """Resumed after any epoch of the shorter run (among them each milestone of the new schedule and the epoch
    before it), every later epoch's rate equals the uninterrupted longer run's."""
    _, optimizer, scheduler = schedule(kind, total, rounding)
    straight = rates(optimizer, scheduler, 1, total)
    for resumed_at in range(1, planned):
        got = extended(kind, planned, total, resumed_at, rounding)
        np.testing.assert_allclose(
            got, straight[resumed_at:], rtol=1e-12, atol=1e-15, err_msg=f"resumed after epoch {resumed_at}"
        )


def test_the_multistep_cases_resume_exactly_at_a_milestone_of_the_new_schedule():
    """The cases above resume at every epoch before the shorter run's end: a new milestone among them."""
    assert 5 in lr_milestones(10) and 5 in range(1, 6)
    assert 6 in lr_milestones(12, "floor") and 6 in range(1, 7)
