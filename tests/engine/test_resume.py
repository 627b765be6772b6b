"""``--resume`` continues a run exactly: data order, augmentation, optimizer and LR schedule.

Fast tests check the resumable sampler and loader on their own; the slow ones train a tiny
detector, "kill" it between two checkpoints and resume it, and compare with a run that was
never interrupted.
"""
import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from dw_d2.data import (
    ResumableBatchSampler,
    ResumableTrainLoader,
    aspect_ratio_group_ids,
    build_resumable_train_loader,
)
from dw_d2.engine import Trainer
from tests.helpers import BUILTIN_DW_CONFIG, RETINANET_CONFIG, make_cfg


# Small enough for a 2-core CPU: a few iterations of 2 images of about 96 px.
TINY = ["SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", (80, 96), "INPUT.MAX_SIZE_TRAIN", 128,
        "SOLVER.BASE_LR", 0.002, "SOLVER.WARMUP_ITERS", 2, "SOLVER.STEPS", (3,),
        "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 2, "DATALOADER.NUM_WORKERS", 0,
        "DATASETS.TEST", (), "MODEL.DEVICE", "cpu", "SEED", 7]


# ---------------------------------------------------------------------------------------------
# The sampler


def test_batches_are_a_pure_function_of_seed_and_iteration():
    groups = np.zeros(23, np.int64)
    first = ResumableBatchSampler(groups, batch_size=4, seed=3)
    stream = [b for b, _ in zip(first, range(30))]
    resumed = ResumableBatchSampler(groups, batch_size=4, seed=3, start_iter=11)
    assert [b for b, _ in zip(resumed, range(19))] == stream[11:]
    assert first.batch(17) == ResumableBatchSampler(groups, 4, seed=3).batch(17)
    other_seed = ResumableBatchSampler(groups, batch_size=4, seed=4)
    assert [other_seed.batch(i) for i in range(6)] != stream[:6]


def test_every_image_appears_each_epoch_and_positions_are_unique():
    sampler = ResumableBatchSampler(np.zeros(10, np.int64), batch_size=4, seed=0)
    assert sampler.batches_per_epoch == 3  # 10 images: the last batch borrows 2
    for epoch in range(3):
        indices = sampler.epoch_batches(epoch).ravel()
        assert set(indices.tolist()) == set(range(10))
    positions = [p for i in range(9) for p, _ in sampler.batch(i)]
    assert positions == list(range(36))
    assert not np.array_equal(sampler.epoch_batches(0), sampler.epoch_batches(1))


def test_aspect_ratio_groups_are_never_mixed():
    dicts = [{"width": 200, "height": 100}] * 7 + [{"width": 100, "height": 180}] * 5
    groups = aspect_ratio_group_ids(dicts)
    assert groups.tolist() == [0] * 7 + [1] * 5
    sampler = ResumableBatchSampler(groups, batch_size=3, seed=1)
    for i in range(20):
        batch_groups = {int(groups[index]) for _, index in sampler.batch(i)}
        assert len(batch_groups) == 1


def test_workers_shard_the_single_worker_stream():
    groups = np.array([0, 1] * 9)
    single = ResumableBatchSampler(groups, 2, seed=5, rank=0, world_size=1)
    ranks = [ResumableBatchSampler(groups, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for i in range(10):
        assert ranks[0].batch(i) == single.batch(2 * i)
        assert ranks[1].batch(i) == single.batch(2 * i + 1)


def test_invalid_sampler_arguments_are_named():
    with pytest.raises(ValueError, match="seed must be non-negative"):
        ResumableBatchSampler([0, 0], 1, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableBatchSampler([0, 0], 0, seed=1)


# ---------------------------------------------------------------------------------------------
# The loader: order and augmentation survive a restart, with or without worker processes


def _random_mapper(record):
    # Stands in for DatasetMapper's augmentations, which draw from the global generators.
    return {"file_name": record["file_name"], "flip": float(np.random.uniform()),
            "noise": float(torch.rand(()))}


def _loader(num_workers=0, start_iter=0, seed=11):
    dicts = [{"file_name": f"{i}.png", "width": 120 + 40 * (i % 2), "height": 140}
             for i in range(9)]
    return ResumableTrainLoader(dicts, _random_mapper, total_batch_size=2, seed=seed,
                                num_workers=num_workers, start_iter=start_iter)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_restarts_where_it_stopped_with_the_same_augmentation():
    uninterrupted = _take(_loader(), 12)
    assert _take(_loader(start_iter=7), 5) == uninterrupted[7:]
    assert _take(_loader(seed=12), 3) != uninterrupted[:3]


def test_loader_start_can_be_set_after_iter():
    # The 2021 SimpleTrainer calls iter() before resume_or_load sets the start iteration.
    loader = _loader()
    it = iter(loader)
    loader.start_iter = 4
    assert next(it) == _take(_loader(), 5)[4]


def test_loader_order_does_not_depend_on_worker_processes():
    assert _take(_loader(num_workers=2, start_iter=3), 5) == _take(_loader(), 8)[3:]


def test_other_training_samplers_are_refused_by_name(tmp_path):
    cfg = make_cfg(RETINANET_CONFIG, tmp_path, *TINY, "DATALOADER.SAMPLER_TRAIN",
                   "RepeatFactorTrainingSampler")
    with pytest.raises(ValueError, match="RepeatFactorTrainingSampler"):
        build_resumable_train_loader(cfg)


def test_augmentation_seeding_leaves_the_global_generators_alone():
    np.random.seed(0)
    expected = np.random.uniform()
    np.random.seed(0)
    _take(_loader(), 2)
    assert np.random.uniform() == expected


# ---------------------------------------------------------------------------------------------
# End to end: kill between checkpoints, resume, compare with an uninterrupted run


class _SimulatedKill(Exception):
    pass


class _KillAt(HookBase):
    """Stops training just before ``iteration`` runs, as a crash or a preemption would."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise _SimulatedKill(f"killed before iteration {self.iteration}")


def _record_inputs(trainer, seen):
    """Record what the model actually receives: file names and the augmented pixels' sums."""
    def record(module, args):
        seen.append([(d["file_name"], float(d["image"].double().sum())) for d in args[0]])
    trainer.model.register_forward_pre_hook(record)


def _train(cfg, *, resume=False, kill_at=None):
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # as train_net.py's default_setup does
    trainer = Trainer(cfg)
    seen = []
    _record_inputs(trainer, seen)
    if kill_at is not None:
        trainer.register_hooks([_KillAt(kill_at)])
    trainer.resume_or_load(resume=resume)
    start = trainer.start_iter
    if kill_at is None:
        trainer.train()
    else:
        with pytest.raises(_SimulatedKill):
            trainer.train()
    return trainer, start, seen


def _resume_configs():
    params = [pytest.param(RETINANET_CONFIG, id="retinanet")]
    params.append(pytest.param(
        BUILTIN_DW_CONFIG, id="dw",
        marks=pytest.mark.skipif(not BUILTIN_DW_CONFIG.exists(), reason=f"{BUILTIN_DW_CONFIG} not written yet"),
    ))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("config_file", _resume_configs())
def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path, config_file):
    reference, _, reference_inputs = _train(make_cfg(config_file, tmp_path / "uninterrupted", *TINY))

    cfg = make_cfg(config_file, tmp_path / "killed", *TINY)
    # A checkpoint after iteration 1; killed before iteration 3 ran. The resumed run redoes
    # iteration 2, then crosses the LR step at 3.
    _, _, killed_inputs = _train(cfg, kill_at=3)
    assert (tmp_path / "killed" / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    resumed, start, resumed_inputs = _train(cfg, resume=True)

    assert start == 2
    assert resumed.iter == reference.iter == cfg.SOLVER.MAX_ITER
    # The same images with the same augmentation, iteration by iteration.
    assert killed_inputs == reference_inputs[:3]
    assert resumed_inputs == reference_inputs[2:]

    # Two uninterrupted CPU runs already differ by ~1e-8 (float summation order in backward);
    # a resume that loses any state (momentum, the loss normaliser, the data order) moves the
    # weights by 1e-5 or more in these 5 iterations.
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5,
                                   atol=1e-6, msg=lambda m: f"{name}: {m}")
    reference_momentum = [s["momentum_buffer"] for s in reference.optimizer.state.values()]
    resumed_momentum = [s["momentum_buffer"] for s in resumed.optimizer.state.values()]
    assert len(resumed_momentum) == len(reference_momentum) > 0
    for expected, actual in zip(reference_momentum, resumed_momentum):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-5)
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


@pytest.mark.slow
def test_random_seed_is_saved_and_reused_on_resume(tmp_path):
    cfg = make_cfg(RETINANET_CONFIG, tmp_path, *TINY, "SEED", -1, "SOLVER.MAX_ITER", 1)
    first, _, _ = _train(cfg)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert saved["trainer"]["train_loader"]["seed"] == first.train_loader.seed

    resumed = Trainer(cfg)  # draws a new random seed ...
    resumed.train_loader.seed = first.train_loader.seed + 1
    resumed.resume_or_load(resume=True)  # ... and the checkpoint's replaces it
    assert resumed.train_loader.seed == first.train_loader.seed
    assert resumed.start_iter == 1
