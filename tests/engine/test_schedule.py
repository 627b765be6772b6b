"""LR steps and warm-up as fractions of SOLVER.MAX_ITER, in the Trainer's scheduler."""
import pytest
import torch
from detectron2.config import get_cfg

from dw_d2 import add_dw_config
from dw_d2.engine import Trainer
from dw_d2.engine.schedule import schedule_in_iterations


def solver_cfg(*opts):
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_list(["SOLVER.BASE_LR", 1.0, "SOLVER.WARMUP_FACTOR", 0.1, *opts])
    return cfg


def lr_per_iteration(cfg):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("max_iter", [200, 1000])
def test_fractions_follow_max_iter(max_iter):
    cfg = solver_cfg("SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", (5000,),
                     "SOLVER.STEP_FRACTIONS", (0.5, 0.75), "SOLVER.WARMUP_FRACTION", 0.1)
    resolved = schedule_in_iterations(cfg)
    assert tuple(resolved.SOLVER.STEPS) == (max_iter // 2, max_iter * 3 // 4)
    assert resolved.SOLVER.WARMUP_ITERS == max_iter // 10
    lrs = lr_per_iteration(cfg)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[max_iter // 10] == pytest.approx(1.0)
    assert lrs[max_iter // 2 - 1] == pytest.approx(1.0)
    assert lrs[max_iter // 2] == pytest.approx(0.1)
    assert lrs[max_iter * 3 // 4] == pytest.approx(0.01)


def test_unset_fractions_leave_the_iteration_keys():
    cfg = solver_cfg("SOLVER.MAX_ITER", 100, "SOLVER.STEPS", (60, 80), "SOLVER.WARMUP_ITERS", 7)
    assert schedule_in_iterations(cfg) is cfg
    lrs = lr_per_iteration(cfg)
    assert lrs[59] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.1)


@pytest.mark.parametrize("opts,key", [
    (("SOLVER.STEP_FRACTIONS", (0.8, 0.5)), "SOLVER.STEP_FRACTIONS"),
    (("SOLVER.STEP_FRACTIONS", (0.5, 1.0)), "SOLVER.STEP_FRACTIONS"),
    (("SOLVER.STEP_FRACTIONS", (0.5, 0.5)), "SOLVER.STEP_FRACTIONS"),
    (("SOLVER.WARMUP_FRACTION", 1.5), "SOLVER.WARMUP_FRACTION"),
])
def test_bad_fractions_are_errors_naming_the_key(opts, key):
    with pytest.raises(ValueError, match=key):
        schedule_in_iterations(solver_cfg("SOLVER.MAX_ITER", 100, *opts))


def test_very_short_runs_keep_only_distinct_steps_before_the_end():
    cfg = solver_cfg("SOLVER.MAX_ITER", 2, "SOLVER.STEP_FRACTIONS", (0.75, 0.92),
                     "SOLVER.WARMUP_FRACTION", 0.1)
    assert tuple(schedule_in_iterations(cfg).SOLVER.STEPS) == ()
    cfg.SOLVER.MAX_ITER = 10
    assert tuple(schedule_in_iterations(cfg).SOLVER.STEPS) == (8, 9)
    assert len(lr_per_iteration(cfg)) == 10
