"""Helpers shared by the test modules: paths, tiny configs and models, small weighting batches.

Test modules import what they need from here (``from tests.helpers import tiny_model``), never
from one another; pytest fixtures live in ``tests/conftest.py``.
"""
import math
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
# The golden cases sit in ``shared/golden`` beside the repository; DW_D2_GOLDEN overrides it.
GOLDEN_DIR = Path(os.environ.get("DW_D2_GOLDEN", REPO.parent / "shared" / "golden"))
BUILTIN_CONFIGS = REPO / "configs" / "Builtin"
BUILTIN_DW_CONFIG = BUILTIN_CONFIGS / "dw_R_18_FPN_shapes.yaml"
RETINANET_CONFIG = REPO / "tests" / "configs" / "retinanet_shapes.yaml"


# --------------------------------------------------------------------------------------------
# Configs and tiny models
# --------------------------------------------------------------------------------------------
NUM_CLASSES = 4


def _builtin_assigners():
    from dw_d2 import ASSIGNER_REGISTRY

    return [name for name, scheme in ASSIGNER_REGISTRY if scheme.__module__.startswith("dw_d2.")]


# The assignment schemes dw-d2 registers (not those a test module adds).
BUILTIN_ASSIGNERS = _builtin_assigners()


def make_cfg(config_file, output_dir, *opts):
    """A frozen config: Detectron2's defaults, dw-d2's keys, ``config_file``, then the KEY VALUE
    ``opts`` and ``OUTPUT_DIR output_dir``."""
    from detectron2.config import get_cfg

    from dw_d2 import add_dw_config

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list([str(o) for o in opts] + ["OUTPUT_DIR", str(output_dir)])
    cfg.freeze()
    return cfg


def tiny_cfg(*overrides):
    """The built-in DW config, shrunk so that a model builds and runs in well under a second."""
    from detectron2.config import get_cfg

    from dw_d2 import add_dw_config

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(BUILTIN_DW_CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.FPN.OUT_CHANNELS", 64,
        "MODEL.DW.NUM_CONVS", 1,
        "MODEL.DW.NUM_CLASSES", NUM_CLASSES,
        *overrides,
    ])
    return cfg


def tiny_model(*overrides, seed=0):
    """A DWDetector of :func:`tiny_cfg` with seeded initial weights."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(tiny_cfg(*overrides))


def image_input(height, width, boxes=(), classes=(), seed=0):
    """A mapped dataset dict: a random uint8-valued float image and its GT instances."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=generator).float()
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": image, "instances": instances, "height": height, "width": width}


def recording_checkpointer(model):
    """The checkpointer of ``train_net.py --eval-only`` for ``model``, keeping Detectron2's
    report of incompatible keys of its last ``load`` in ``.incompatible``."""
    from dw_d2.engine import EvaluationCheckpointer

    class RecordingCheckpointer(EvaluationCheckpointer):
        def _load_model(self, checkpoint):
            self.incompatible = super()._load_model(checkpoint)
            return self.incompatible

    return RecordingCheckpointer(model)


# --------------------------------------------------------------------------------------------
# train_net.py
# --------------------------------------------------------------------------------------------
# A few iterations of 2 small images: seconds on a 2-core CPU.
TINY = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(80, 96)",
        "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
        "SOLVER.BASE_LR", "0.002", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(100,)",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "3"]


def run_train_net(*argv):
    """``train_net.py`` with these command-line arguments, in this process."""
    from detectron2.engine import default_argument_parser

    import train_net

    args = default_argument_parser().parse_args([str(a) for a in argv])
    return train_net.main(args)


# --------------------------------------------------------------------------------------------
# Small weighting batches for the public weighting functions
# --------------------------------------------------------------------------------------------
STRIDES = (8, 16, 32, 64, 128)
DW_INPUTS = ("cls_logits", "box_dists", "score_logits")
AA_INPUTS = ("cls_logits", "box_dists", "score_logits", "prior_mean", "prior_sigma")


def make_points(height, width, offset):
    """(R, 2) float64 points and (R,) strides of a (height, width) input, levels P3-P7."""
    points, strides = [], []
    for stride in STRIDES:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = torch.stack((x.reshape(-1), y.reshape(-1)), 1)
        points.append((xy + offset) * stride)
        strides.append(torch.full((h * w,), float(stride)))
    return torch.cat(points).double(), torch.cat(strides).double()


def make_batch(seed=0, gt_per_image=(3, 2), num_classes=4, size=(64, 96), offset=0.5):
    """A small random batch in float64 (2 images 64x96 by default, 129 points)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    points, strides = make_points(*size, offset)
    num_images, num_points = len(gt_per_image), points.shape[0]
    gt_boxes, gt_classes = [], []
    for count in gt_per_image:
        centre = uniform(count, 2) * torch.tensor(size[::-1])
        half = 8 + uniform(count, 2) * 24
        gt_boxes.append(torch.cat((centre - half, centre + half), 1))
        gt_classes.append(torch.randint(num_classes, (count,), generator=generator))
    batch = {
        "points": points,
        "strides": strides,
        "cls_logits": normal(num_images, num_points, num_classes),
        "box_dists": uniform(num_images, num_points, 4) * strides[None, :, None] * 3,
        "score_logits": normal(num_images, num_points, 1),
        "gt_boxes": gt_boxes,
        "gt_classes": gt_classes,
        "prior_mean": 0.3 * normal(num_classes, 2),
        "prior_sigma": 0.5 + uniform(num_classes, 2),
    }
    return batch


def run_dw(batch, **hyper):
    """:func:`dw_d2.dual_weighting_loss` on a :func:`make_batch` batch."""
    from dw_d2 import dual_weighting_loss

    return dual_weighting_loss(batch["points"], batch["strides"], batch["cls_logits"],
                               batch["box_dists"], batch["score_logits"], batch["gt_boxes"],
                               batch["gt_classes"], **hyper)


def run_aa(batch, **hyper):
    """:func:`dw_d2.autoassign_loss` on a :func:`make_batch` batch."""
    from dw_d2 import autoassign_loss

    return autoassign_loss(batch["points"], batch["strides"], batch["cls_logits"],
                           batch["box_dists"], batch["score_logits"], batch["gt_boxes"],
                           batch["gt_classes"], batch["prior_mean"], batch["prior_sigma"], **hyper)


def with_leaves(batch, names):
    """The batch with fresh leaf copies of the named tensors, requiring gradients."""
    batch = dict(batch)
    for name in names:
        batch[name] = batch[name].clone().requires_grad_()
    return batch


# --------------------------------------------------------------------------------------------
# Forked gloo workers
# --------------------------------------------------------------------------------------------
def _gloo_worker(rank, world_size, init_file, timeout_s, step, results):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        # Plain pickle copies the tensors: the queue's own pickler would share their memory
        # with a process that exits before the parent reads them.
        results.put((rank, pickle.dumps(step(rank)), None))
    except BaseException:  # handed to the parent, which fails the test with it
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_gloo_workers(step, init_file, world_size=2, timeout_s=60):
    """``step(rank)`` on ``world_size`` forked processes in one gloo group (one thread each)
    -> {rank: what step returned}.

    Fails the test (never hangs it) when a worker raises, dies or stays silent for
    ``timeout_s`` seconds, which is also the collectives' timeout.
    """
    # fork: the workers inherit the imported modules and the models, about a second in all.
    context = mp.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_gloo_worker, daemon=True,
                               args=(rank, world_size, init_file, timeout_s, step, results))
               for rank in range(world_size)]
    for worker in workers:
        worker.start()
    outputs, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            try:
                rank, output, error = results.get(timeout=0.5)
            except queue.Empty:
                dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    pytest.fail(f"distributed workers gave no result (exit codes "
                                f"{[w.exitcode for w in workers]})")
                continue
            if error is not None:
                pytest.fail(f"distributed worker {rank} failed:\n{error}")
            outputs[rank] = pickle.loads(output)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
    return outputs
