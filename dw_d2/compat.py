"""Where the Detectron2 versions dw-d2 runs on differ, and how dw-d2 bridges them.

dw-d2 runs on two Detectron2s: upstream main (what users install from its git repository;
tested at commit 02b5c4e2, June 2026) and the 2021 source snapshot that machines without
GitHub access install from PyPI (upstream commit 72e9dd6e, October 2021). Both report
version "0.6", so every difference is detected by the feature itself, never by a version
number. This module is the one place that knows about them.

Each difference, as "snapshot -> upstream (date of the upstream change)":

* ``FCOS.label_anchors`` / ``FCOS.losses``: the matched GT boxes are ``Boxes`` and an image
  without GT boxes fails -> they are ``(R, 4)`` tensors, which ``losses`` stacks with
  ``torch.stack``, and empty images work (2022-02; detected by ``FCOS._match_anchors``).
* ``RetinaNetHead`` (and so ``FCOSHead``) with ``norm="GN"``: it probes the norm type with
  ``get_norm(norm, 1)``, which fails for "GN" -> it probes with 32 channels (2022-08).
* ``DefaultTrainer.state_dict``: model, iteration and scheduler only -> also the optimizer,
  under ``"_trainer"`` (2021-11).
* ``launch`` on a machine without CUDA: always NCCL, so it fails -> gloo (2023-01); the group
  of the processes on one machine is then made by ``comm.create_local_process_group``
  (2023-01), where the snapshot's launcher sets ``comm._LOCAL_PROCESS_GROUP`` itself.
* ``DefaultTrainer`` with several CPU processes: ``create_ddp_model`` passes
  ``device_ids=[local rank]``, which ``DistributedDataParallel`` refuses for a CPU model ->
  unchanged: both versions fail there.

Differences that need no switch, because dw-d2's code works with both as it is:
``SimpleTrainer`` calls ``iter(data_loader)`` in its constructor in the snapshot and lazily
upstream (dw-d2's training loader starts its workers on the first ``next()``, see
:mod:`dw_d2.data.build`); the snapshot's ``comm.all_gather`` pickles through the deprecated
``TypedStorage`` (a warning, same result); ``DenseDetector`` moves inputs with
``move_device_like`` upstream (not called by dw-d2); the compiled ``detectron2._C`` is absent
from the snapshot (see :func:`dw_d2.env.has_compiled_ops`).
"""
import contextlib
import math
from typing import List

import torch
from detectron2.engine import DefaultTrainer
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.structures import Boxes
from detectron2.utils import comm

__all__ = [
    "DEFAULT_TRAINER_SAVES_OPTIMIZER",
    "DETECTRON2_LAUNCH_SUPPORTS_CPU",
    "FCOS_MATCHED_BOXES_ARE_TENSORS",
    "create_local_process_group",
    "ddp_without_device_ids_on_cpu",
    "fcos_matched_boxes",
    "group_norm",
]

# Upstream's FCOS fix for images without GT boxes (February 2022) renamed match_anchors to
# _match_anchors and made label_anchors return the matched boxes as tensors, which losses()
# stacks with torch.stack; the snapshot's losses() reads Boxes.tensor instead.
FCOS_MATCHED_BOXES_ARE_TENSORS = hasattr(FCOS, "_match_anchors")

# Later Detectron2 versions checkpoint the optimizer themselves (DefaultTrainer.state_dict
# then stores SimpleTrainer's state under "_trainer"); the 2021 snapshot does not.
DEFAULT_TRAINER_SAVES_OPTIMIZER = "state_dict" in vars(DefaultTrainer)

# Detectron2's launch() picks gloo when CUDA is absent since January 2023; the same month
# comm gained create_local_process_group, which stands for that version here (a version of
# the two weeks in between is treated as the snapshot: still correct, via dw-d2's own path).
DETECTRON2_LAUNCH_SUPPORTS_CPU = hasattr(comm, "create_local_process_group")


def fcos_matched_boxes(boxes: torch.Tensor):
    """``(R, 4)`` matched GT boxes in the form this Detectron2's ``FCOS.losses`` takes:
    the tensor itself upstream, ``Boxes`` in the snapshot."""
    return boxes if FCOS_MATCHED_BOXES_ARE_TENSORS else Boxes(boxes)


def group_norm(channels: int) -> torch.nn.GroupNorm:
    """Detectron2's "GN" (GroupNorm with 32 groups) as a callable, for ``RetinaNetHead`` and
    ``FCOSHead``: the snapshot's head probes its norm type with ``get_norm(norm, 1)``, which
    fails for the string "GN" (32 groups cannot divide 1 channel); this answers the probe with
    one group."""
    return torch.nn.GroupNorm(math.gcd(32, channels), channels)


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Make ``detectron2.utils.comm``'s group of the processes on this machine, as Detectron2's
    own ``launch`` does, so that ``comm.get_local_rank()``, ``get_local_size()`` and
    per-machine collectives work. Call it on every process, after
    ``torch.distributed.init_process_group`` (it creates groups: a collective)."""
    if DETECTRON2_LAUNCH_SUPPORTS_CPU:
        comm.create_local_process_group(num_workers_per_machine)
        return
    # The snapshot has no function for it: its _distributed_worker sets the module attribute.
    world_size, rank = comm.get_world_size(), comm.get_rank()
    if world_size % num_workers_per_machine != 0:
        raise ValueError(f"world size {world_size} is not a multiple of the "
                         f"{num_workers_per_machine} processes per machine")
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("Detectron2's local process group already exists")
    for machine in range(world_size // num_workers_per_machine):
        first = machine * num_workers_per_machine
        ranks: List[int] = list(range(first, first + num_workers_per_machine))
        group = torch.distributed.new_group(ranks)  # every process creates every group
        if rank in ranks:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_without_device_ids_on_cpu():
    """Within this block, Detectron2's ``create_ddp_model`` wraps a model whose parameters
    are on the CPU without ``device_ids``.

    ``DefaultTrainer.__init__`` calls ``create_ddp_model(model, broadcast_buffers=False)``,
    which passes ``device_ids=[comm.get_local_rank()]``; PyTorch's
    ``DistributedDataParallel`` refuses ``device_ids`` for a CPU module, so neither Detectron2
    version can train with several CPU processes as it is. GPU models are wrapped unchanged.
    """
    import detectron2.engine.defaults as d2_defaults

    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and "device_ids" not in kwargs:
            kwargs["device_ids"] = None
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original
