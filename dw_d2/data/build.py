"""The training data loader of dw-d2's Trainer: validated dicts, resumable order and augmentation.

:func:`build_resumable_train_loader` takes the place of Detectron2's
``build_detection_train_loader`` (same config keys, same ``list[dict]`` batches from
``DatasetMapper``) with two differences that make ``--resume`` continue exactly where a run
stopped:

* the batch of iteration ``i`` comes from :class:`~dw_d2.data.samplers.ResumableBatchSampler`,
  a pure function of ``(seed, i)``; the loader starts at :attr:`ResumableTrainLoader.start_iter`,
  which the Trainer sets from the checkpoint after ``resume_or_load``;
* each sample's random augmentation (flip, scale choice: Detectron2's augmentations draw from
  the global ``numpy``/``random``/``torch`` generators) is seeded from ``(seed, position)``, the
  sample's place in the stream, so it no longer depends on how many samples a data-loading
  worker has mapped before; the global generators are restored after each sample.

Batches keep their order with any ``DATALOADER.NUM_WORKERS``: each worker maps whole batches and
PyTorch's ``DataLoader`` returns the workers' outputs round-robin.

The seed is ``cfg.SEED`` when it is non-negative; otherwise one is drawn (the same on all
workers), logged, and saved in the Trainer's checkpoints, so that a resumed run reuses it.
"""
import contextlib
import logging
import random
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetFromList, DatasetMapper, MetadataCatalog
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samplers import ResumableBatchSampler, aspect_ratio_group_ids
from .validation import (
    CHANGE_CAUSES,
    check_annotations,
    check_image_files,
    load_dataset_dicts,
    validate_dataset_dicts,
)

logger = logging.getLogger(__name__)


def load_training_dataset_dicts(
    dataset_names: Sequence[str], *, filter_empty: bool, report_dir: Optional[str] = None
) -> List[dict]:
    """Load, validate and concatenate training datasets.

    Like Detectron2's ``get_detection_dataset_dicts`` (same metadata consistency check), plus
    :func:`~dw_d2.data.validation.validate_dataset_dicts` on each dataset (annotations and
    image files; the list of changed annotations goes to ``report_dir``). Images without
    (non-crowd) annotations are dropped only when ``filter_empty``
    (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), after validation, which may empty an image.
    """
    if isinstance(dataset_names, str):
        dataset_names = [dataset_names]
    if not dataset_names:
        raise ValueError("DATASETS.TRAIN is empty: name at least one registered dataset.")
    dataset_dicts = []
    for name in dataset_names:
        dicts = load_dataset_dicts(name)
        if len(dicts) == 0:
            raise ValueError(f"Dataset '{name}' is empty.")
        dataset_dicts.extend(validate_dataset_dicts(dicts, name, report_dir=report_dir))
    if len(dataset_names) > 1:
        check_metadata_consistency("thing_classes", dataset_names)

    if filter_empty:
        kept = [d for d in dataset_dicts
                if any(not a.get("iscrowd", 0) for a in d.get("annotations", ()))]
        logger.info(f"Removed {len(dataset_dicts) - len(kept)} images without (non-crowd) "
                    f"annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS). {len(kept)} images left.")
        if not kept:
            raise ValueError(f"No training image of {list(dataset_names)} has an annotation.")
        dataset_dicts = kept
    thing_classes = MetadataCatalog.get(dataset_names[0]).get("thing_classes")
    _log_class_histogram(dataset_dicts, thing_classes)
    return dataset_dicts


def check_evaluation_dataset(dataset_name: str) -> None:
    """Check an evaluation dataset before anything trains or evaluates on it.

    Its image files are checked as the training images are (an unreadable file or a size
    mismatch would stop ``DatasetMapper`` halfway through an evaluation, possibly after hours
    of training), and its annotations for unusable values (NaN boxes, unknown categories),
    which would make ``COCOEvaluator``'s numbers silently wrong. Boxes that are degenerate or
    outside their image are only counted in the log: the evaluator reads the annotation file
    as it is, and no detection can match them.
    """
    dicts = load_dataset_dicts(dataset_name)
    _, changes = check_annotations(dicts, dataset_name)
    unmatchable = [c for c in changes if c.cause in ("degenerate", "outside")]
    if unmatchable:
        logger.warning(
            f"Evaluation dataset '{dataset_name}': {len(unmatchable)} ground-truth boxes "
            f"({CHANGE_CAUSES['degenerate'].split(': ')[1]}, or wholly outside their image) "
            f"can match no detection, e.g. {unmatchable[0].describe()}."
        )
    check_image_files(dicts, dataset_name)


def _log_class_histogram(dataset_dicts: List[dict], thing_classes: Optional[List[str]]) -> None:
    # Detectron2 2021's print_instances_class_histogram uses np.int, which NumPy 2 removed.
    if thing_classes is None:
        return
    category_ids = np.array([a["category_id"] for d in dataset_dicts
                             for a in d.get("annotations", ()) if not a.get("iscrowd", 0)],
                            dtype=np.int64)
    counts = np.bincount(category_ids, minlength=len(thing_classes))
    logger.info(f"Training instances per category ({int(counts.sum())} in "
                f"{len(dataset_dicts)} images): "
                + ", ".join(f"{name}: {int(n)}" for name, n in zip(thing_classes, counts)))


def sample_seed(seed: int, position: int) -> int:
    """The 32-bit seed of the augmentation of the sample at ``position`` of the stream."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed Python's, NumPy's and torch's (CPU) global generators; restore them on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _as_is(batch):
    return batch


class _MappedBatches(IterableDataset):
    """The mapped batches of a batch sampler; data-loading worker ``w`` of ``n`` maps the
    batches ``w, w + n, ...`` (PyTorch returns them round-robin: the order is kept)."""

    def __init__(self, dataset, mapper: Callable, batch_sampler: ResumableBatchSampler):
        self.dataset = dataset
        self.mapper = mapper
        self.batch_sampler = batch_sampler

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for k, batch in enumerate(self.batch_sampler):
            if k % num_workers == worker_id:
                yield [self._map(position, index) for position, index in batch]

    def _map(self, position: int, index: int) -> dict:
        with seeded_global_rngs(sample_seed(self.batch_sampler.seed, position)):
            mapped = self.mapper(self.dataset[index])
        if mapped is None:
            raise ValueError(
                f"The mapper returned None for training image #{index}; the resumable loader "
                f"cannot replace skipped samples (Detectron2's MapDataset would pick a random "
                f"other one, which breaks the reproducible order). Filter the dataset instead."
            )
        return mapped


class ResumableTrainLoader:
    """This worker's training batches (each a ``list[dict]`` from the mapper), endless.

    Iterating starts at batch :attr:`start_iter`. The underlying PyTorch ``DataLoader`` (and
    its worker processes) is created on the first ``next()``, not by ``iter()``: the 2021
    Detectron2 ``SimpleTrainer`` calls ``iter(data_loader)`` in its constructor, before
    ``resume_or_load`` knows the start iteration.
    """

    def __init__(
        self,
        dataset: List[dict],
        mapper: Callable,
        *,
        total_batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        start_iter: int = 0,
    ):
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size != 0:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive "
                             f"multiple of the number of workers ({world_size}).")
        self.dataset_dicts = dataset
        self._dataset = DatasetFromList(dataset, copy=False)
        self.mapper = mapper
        self.batch_size = total_batch_size // world_size
        self.seed = int(seed)
        self.group_ids = (aspect_ratio_group_ids(dataset) if aspect_ratio_grouping
                          else np.zeros(len(dataset), np.int64))
        self.num_workers = num_workers
        self.start_iter = start_iter

    def batch_sampler(self, start_iter: Optional[int] = None) -> ResumableBatchSampler:
        return ResumableBatchSampler(
            self.group_ids, self.batch_size, self.seed,
            start_iter=self.start_iter if start_iter is None else start_iter,
        )

    def file_names(self, iteration: int) -> List[str]:
        """The image files of this worker's batch of ``iteration`` (for error reports)."""
        return [self.dataset_dicts[i]["file_name"]
                for _, i in self.batch_sampler().batch(iteration)]

    def __iter__(self):
        batches = _MappedBatches(self._dataset, self.mapper, self.batch_sampler())
        yield from DataLoader(
            batches, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is
        )

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the seed of the data order (takes effect at the next ``iter()``)."""
        if state_dict.get("seed") is not None and int(state_dict["seed"]) != self.seed:
            logger.info(f"Data order seed {state_dict['seed']} restored from the checkpoint "
                        f"(instead of {self.seed}).")
            self.seed = int(state_dict["seed"])


def _resumable_train_loader_from_config(cfg, mapper=None, *, dataset=None, seed=None):
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported: "
            f"dw-d2's Trainer replaces TrainingSampler by its resumable sampler."
        )
    if cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS:
        raise ValueError("MODEL.KEYPOINT_ON and MODEL.LOAD_PROPOSALS are not supported by "
                         "dw-d2's training loader (its detectors use neither).")
    if dataset is None:
        dataset = load_training_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            report_dir=cfg.OUTPUT_DIR,
        )
    if mapper is None:
        mapper = DatasetMapper(cfg, True)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        if cfg.SEED < 0:
            logger.info(f"SEED is negative: the training data order uses the random seed "
                        f"{seed} (saved in checkpoints, reused by --resume).")
    return {
        "dataset": dataset,
        "mapper": mapper,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "seed": seed,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
    }


@configurable(from_config=_resumable_train_loader_from_config)
def build_resumable_train_loader(
    dataset: List[dict],
    *,
    mapper: Callable,
    total_batch_size: int,
    seed: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    start_iter: int = 0,
) -> ResumableTrainLoader:
    """Build the training loader; called with a config like ``build_detection_train_loader``.

    Args:
        dataset: Detectron2 dataset dicts (from config: ``DATASETS.TRAIN``, loaded and
            validated by :func:`load_training_dataset_dicts`).
        mapper: maps a dataset dict to the model's input (default ``DatasetMapper(cfg, True)``).
        total_batch_size: images per iteration over all workers (``SOLVER.IMS_PER_BATCH``).
        seed: seed of the order and augmentation (``SEED``, or a random one if negative).
        aspect_ratio_grouping: batches hold only landscape or only portrait images.
        num_workers: data-loading processes (``DATALOADER.NUM_WORKERS``).
        start_iter: the iteration whose batch comes first.

    Returns:
        ResumableTrainLoader
    """
    return ResumableTrainLoader(
        dataset, mapper, total_batch_size=total_batch_size, seed=seed,
        aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers,
        start_iter=start_iter,
    )
