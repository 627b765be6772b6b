"""LR schedules that follow ``SOLVER.MAX_ITER``: steps and warm-up given as fractions of it.

Detectron2's ``SOLVER.STEPS`` and ``SOLVER.WARMUP_ITERS`` are iteration counts: overriding
``SOLVER.MAX_ITER`` alone (a shorter run on a small dataset) leaves the LR drops where they
were, possibly past the end. ``SOLVER.STEP_FRACTIONS`` and ``SOLVER.WARMUP_FRACTION`` (keys
added by :func:`dw_d2.add_dw_config`) say where they fall as fractions of ``MAX_ITER``;
:func:`schedule_in_iterations` turns them into the iteration keys Detectron2's scheduler reads.
"""
import logging

__all__ = ["schedule_in_iterations"]

logger = logging.getLogger(__name__)


def schedule_in_iterations(cfg):
    """``cfg`` with ``SOLVER.STEPS`` / ``SOLVER.WARMUP_ITERS`` computed from
    ``SOLVER.STEP_FRACTIONS`` / ``SOLVER.WARMUP_FRACTION`` when those are set.

    A step lands at ``round(fraction * MAX_ITER)`` (at least 1; in a run so short that two
    steps round onto the same iteration, or onto ``MAX_ITER``, the extra ones are dropped);
    steps are strictly increasing fractions in (0, 1). The warm-up fraction is in [0, 1]. A config without the fraction keys,
    or with them unset (``()`` / negative), is returned unchanged.

    Returns:
        CfgNode: ``cfg`` itself, or a clone with the iteration keys replaced.
    """
    solver = cfg.SOLVER
    fractions = tuple(solver.get("STEP_FRACTIONS", ()))
    warmup = solver.get("WARMUP_FRACTION", -1.0)
    if not fractions and warmup < 0:
        return cfg
    max_iter = solver.MAX_ITER
    if fractions:
        if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(set(fractions)):
            raise ValueError(f"SOLVER.STEP_FRACTIONS must be strictly increasing fractions of "
                             f"SOLVER.MAX_ITER in (0, 1), got {fractions}")
    if warmup >= 0 and warmup > 1:
        raise ValueError(f"SOLVER.WARMUP_FRACTION must be in [0, 1] (or negative: unset), "
                         f"got {warmup}")
    cfg = cfg.clone()
    cfg.defrost()
    if fractions:
        # Very short runs: steps that round onto each other or onto MAX_ITER (where
        # Detectron2's scheduler refuses them) are dropped.
        steps = sorted({max(1, round(f * max_iter)) for f in fractions})
        cfg.SOLVER.STEPS = tuple(s for s in steps if s < max_iter)
    if warmup >= 0:
        cfg.SOLVER.WARMUP_ITERS = round(warmup * max_iter)
    logger.info(f"Schedule for SOLVER.MAX_ITER {max_iter}: LR steps at {tuple(cfg.SOLVER.STEPS)}"
                f", warm-up {cfg.SOLVER.WARMUP_ITERS} iterations (from SOLVER.STEP_FRACTIONS "
                f"{fractions or 'unset'}, SOLVER.WARMUP_FRACTION "
                f"{warmup if warmup >= 0 else 'unset'})")
    cfg.freeze()
    return cfg
