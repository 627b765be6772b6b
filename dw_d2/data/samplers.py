"""A training sampler whose order survives ``--resume``.

Detectron2's ``TrainingSampler`` draws one endless shuffled stream from a seed and always starts
it from the beginning, so a resumed run sees different images than the run it continues (and
``AspectRatioGroupedDataset`` carries half-filled buckets from batch to batch, which no
checkpoint records). :class:`ResumableBatchSampler` instead makes the batch of every iteration
a pure function of ``(seed, iteration)``, so a run resumed at iteration ``i`` gets exactly the
batches ``i, i + 1, ...`` that the uninterrupted run got.

The order: epoch ``e`` is a permutation of the dataset drawn from a generator seeded with
``(seed, e)``. With aspect-ratio grouping, the permutation is split by group (order kept), each
group is cut into batches of the total batch size (its last batch is completed with the group's
first images of that epoch, so every image appears at least once per epoch), and the epoch's
batches are shuffled by the same generator. Without grouping there is one group. The epochs
are concatenated into one stream of batches, whose ``i``-th batch is iteration ``i``'s; of
``W`` distributed workers, worker ``r`` takes the ``r``-th of ``W`` equal parts of each batch.
So the images of an iteration, and their places in the stream (which seed their
augmentation), are the same for any number of workers. (Detectron2's sampler deals single
images out to the workers instead, and each worker groups its own images into batches: the
images an iteration sees then depend on the number of workers.)
"""
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.utils import comm
from torch.utils.data.sampler import Sampler


def aspect_ratio_group_ids(dataset_dicts: Sequence[dict]) -> np.ndarray:
    """Detectron2's two aspect-ratio groups: 0 for landscape (``width > height``), else 1.

    Returns:
        np.ndarray: (N,) int64, one group per image.
    """
    return np.array([0 if d["width"] > d["height"] else 1 for d in dataset_dicts], np.int64)


class ResumableBatchSampler(Sampler):
    """Endless stream of this worker's training batches, starting at ``start_iter``.

    Each element is this worker's part of one iteration's batch: a list of ``batch_size``
    pairs ``(position, index)``, where ``index`` is the image's index in the dataset and
    ``position`` is the sample's unique place in the stream of all workers (the loader
    seeds the sample's augmentation with it).
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        start_iter: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        """
        Args:
            group_ids: (N,) group of each image; batches never mix groups. Pass
                :func:`aspect_ratio_group_ids` for aspect-ratio grouping, zeros for none.
            batch_size: images per batch on this worker; the whole batch of an iteration
                has ``batch_size * world_size``.
            seed: non-negative; the same on every worker.
            start_iter: the iteration whose batch comes first.
            rank, world_size: this worker's place; default: from ``detectron2.utils.comm``.
        """
        self._group_ids = np.asarray(group_ids, dtype=np.int64)
        if self._group_ids.ndim != 1 or self._group_ids.size == 0:
            raise ValueError(f"group_ids must be a non-empty 1-d sequence, got shape "
                             f"{self._group_ids.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be non-negative, got {start_iter}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_iter = int(start_iter)
        self.rank = comm.get_rank() if rank is None else int(rank)
        self.world_size = comm.get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.total_batch_size = self.batch_size * self.world_size
        self._groups = np.unique(self._group_ids)
        group_sizes = np.bincount(np.searchsorted(self._groups, self._group_ids))
        self.batches_per_epoch = int(sum(math.ceil(n / self.total_batch_size)
                                         for n in group_sizes))
        self._cached_epoch: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All batches of one epoch (of all workers), in stream order.

        Returns:
            np.ndarray: (batches_per_epoch, total_batch_size) int64 dataset indices.
        """
        if self._cached_epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self._group_ids.size)
            groups_in_order = self._group_ids[order]
            batches = []
            for group in self._groups:  # at most a handful of groups
                members = order[groups_in_order == group]
                size = self.total_batch_size
                padded = math.ceil(members.size / size) * size
                # np.resize repeats cyclically: the last batch borrows the group's first images.
                batches.append(np.resize(members, padded).reshape(-1, size))
            batches = np.concatenate(batches)
            self._cached_epoch = (epoch, batches[rng.permutation(len(batches))])
        return self._cached_epoch[1]

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        """This worker's part of the batch of ``iteration``: ``batch_size`` pairs
        ``(position, index)``."""
        epoch, within = divmod(iteration, self.batches_per_epoch)
        first = self.rank * self.batch_size
        indices = self.epoch_batches(epoch)[within, first:first + self.batch_size]
        first_position = iteration * self.total_batch_size + first
        return [(first_position + j, int(i)) for j, i in enumerate(indices)]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1
