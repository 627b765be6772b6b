"""dw-d2's ``Trainer``: Detectron2's ``DefaultTrainer`` made reliable to resume and debug.

On top of ``DefaultTrainer`` it

* evaluates with ``COCOEvaluator`` (the official pycocotools path when Detectron2's compiled
  operators are missing), writing to ``OUTPUT_DIR/inference``, with COCO's ``maxDets`` at
  ``TEST.DETECTIONS_PER_IMAGE``, so that AP is not capped on images with over 100 objects;
* loads the training data with :func:`~dw_d2.data.build_resumable_train_loader`: annotations
  and image files validated before training starts (the list of dropped, clipped and ignored
  annotations written to ``OUTPUT_DIR``), and an order and augmentation that ``--resume``
  continues exactly (the loader starts at the iteration restored from the checkpoint);
* checks the image files (and unusable annotations) of the evaluation datasets before
  training starts, and before each evaluation, so that a bad file stops the run before
  iteration 0 rather than in the final evaluation;
* checks that the model's number of classes matches the datasets';
* places the LR steps and warm-up at fractions of ``SOLVER.MAX_ITER`` when
  ``SOLVER.STEP_FRACTIONS`` / ``SOLVER.WARMUP_FRACTION`` are set (:mod:`.schedule`);
* saves in checkpoints what Detectron2's leave out: the optimizer's state (Detectron2 2021's
  ``DefaultTrainer`` saves only the model, iteration and LR scheduler, so a resumed run lost
  SGD's momentum), the loss-normaliser EMA of Detectron2's dense detectors (RetinaNet keeps it
  in a plain attribute) and the data order's seed (which matters when ``SEED`` is negative);
* when the loss becomes NaN or infinite (Detectron2 raises ``FloatingPointError`` naming the
  iteration), saves ``model_before_nonfinite.pth`` before re-raising: the weights and optimizer
  state at that iteration (Detectron2 checks the loss before ``optimizer.step()``, so the failed
  step was not applied) and the batch's image files. It is not tagged as the last checkpoint:
  ``--resume`` continues from the last periodic checkpoint, which nothing overwrites;
* when training ends, draws a validation image's detections and the training curves into
  ``OUTPUT_DIR`` and says where they are; :meth:`Trainer.train` returns the results of the
  last evaluation (Detectron2's returns them only when ``TEST.EXPECTED_RESULTS`` is set).
"""
import logging
import os

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..compat import DEFAULT_TRAINER_SAVES_OPTIMIZER, ddp_without_device_ids_on_cpu
from ..data import build_resumable_train_loader, check_evaluation_dataset, prepare_dataset
from ..env import has_compiled_ops
from .checks import check_num_classes
from .schedule import schedule_in_iterations

logger = logging.getLogger(__name__)

NONFINITE_CHECKPOINT = "model_before_nonfinite.pth"

# Model attributes that change during training but are neither parameters nor buffers:
# DenseDetector._ema_update keeps RetinaNet's EMA of the number of foreground anchors here.
_PLAIN_MODEL_STATE = ("loss_normalizer",)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO evaluation, validated and resumable training data, full
    checkpoints and a snapshot at a non-finite loss (see the module docstring)."""

    def __init__(self, cfg):
        # Several processes on the CPU (train_net.py --num-gpus N without CUDA): Detectron2
        # would give DistributedDataParallel a GPU device id for a CPU model.
        with ddp_without_device_ids_on_cpu():
            super().__init__(cfg)
        # The loader from build_train_loader: resume_or_load tells it where to start.
        self.train_loader = self.data_loader
        for dataset_name in cfg.DATASETS.TEST:
            check_evaluation_dataset(dataset_name)

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable loader of ``cfg.DATASETS.TRAIN``, validated; it starts at iteration 0
        until ``resume_or_load`` moves it."""
        loader = build_resumable_train_loader(cfg)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        return loader

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """Detectron2's scheduler, with the steps and warm-up of ``SOLVER.STEP_FRACTIONS`` /
        ``SOLVER.WARMUP_FRACTION`` when they are set."""
        return super().build_lr_scheduler(schedule_in_iterations(cfg), optimizer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader, after :func:`~dw_d2.data.check_evaluation_dataset` (cached
        image checks: after the check at start-up this costs one ``stat`` per image)."""
        check_evaluation_dataset(dataset_name)
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """``COCOEvaluator`` for datasets in COCO format (``evaluator_type`` "coco" or unset).

        AP is computed over the ``TEST.DETECTIONS_PER_IMAGE`` best detections of each image
        (COCO's ``maxDets``): pycocotools' default of 100 would silently cap the recall, and
        so the AP, of images with more objects than that however many the detector returns.
        With the default 100 this is COCO's standard AP.
        """
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r}; dw-d2's "
                f"detectors are evaluated with COCOEvaluator only."
            )
        prepare_dataset(dataset_name)  # COCOEvaluator reads json_file in its constructor
        check_num_classes(cfg, [dataset_name])
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops(),
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )

    def resume_or_load(self, resume=True):
        """Detectron2's ``resume_or_load``; then the training data continue at
        ``start_iter`` (0 without a checkpoint to resume)."""
        super().resume_or_load(resume=resume)
        self.train_loader.start_iter = self.start_iter

    def train(self):
        """Train; return the results of the last evaluation, as ``Trainer.test`` returned them
        (empty without ``DATASETS.TEST``)."""
        results = super().train()
        if results is None:
            results = getattr(self, "_last_eval_results", None) or {}
        if comm.is_main_process() and self.cfg.DATASETS.TEST:
            # Imported here: drawing needs matplotlib and OpenCV, training does not.
            from ..viz import write_run_pictures

            for path in write_run_pictures(self.cfg, self.cfg.OUTPUT_DIR):
                logger.info(f"Wrote {path}")
        return results

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError:
            self.save_nonfinite_snapshot()
            raise

    def save_nonfinite_snapshot(self) -> None:
        """Write ``OUTPUT_DIR/model_before_nonfinite.pth`` (main process only; see above)."""
        if not comm.is_main_process():
            return
        model_state = self.checkpointer.model.state_dict()
        nonfinite = [name for name, value in model_state.items()
                     if value.is_floating_point() and not torch.isfinite(value).all()]
        snapshot = {"model": model_state}
        snapshot.update({key: obj.state_dict()
                         for key, obj in self.checkpointer.checkpointables.items()})
        batch_files = self.train_loader.file_names(self.iter)
        snapshot.update(iteration=self.iter, batch_file_names=batch_files,
                        nonfinite_parameters=nonfinite)
        path = os.path.join(self.cfg.OUTPUT_DIR, NONFINITE_CHECKPOINT)
        with PathManager.open(path, "wb") as f:
            torch.save(snapshot, f)
        last = (self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint() else None)
        logger.error(
            f"Non-finite loss at iteration {self.iter}; the optimizer step was not taken. "
            f"Saved the weights and optimizer state of that iteration and its batch's files "
            f"({', '.join(batch_files)}) to {path} (not tagged as last checkpoint). "
            + (f"Non-finite weights: {', '.join(nonfinite[:5])}. " if nonfinite else
               "All weights are finite. ")
            + (f"--resume continues from {last}." if last else
               "No periodic checkpoint had been written yet.")
        )

    def state_dict(self):
        state = super().state_dict()
        if not DEFAULT_TRAINER_SAVES_OPTIMIZER:
            state["_trainer"] = self._trainer.state_dict()
        state["train_loader"] = self.train_loader.state_dict()
        model = self.checkpointer.model
        state["model_attributes"] = {name: getattr(model, name)
                                     for name in _PLAIN_MODEL_STATE if hasattr(model, name)}
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not DEFAULT_TRAINER_SAVES_OPTIMIZER:
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])
            else:
                logger.warning("The checkpoint has no optimizer state (written by Detectron2's "
                               "DefaultTrainer?): the optimizer starts afresh.")
        if "train_loader" in state_dict:
            self.train_loader.load_state_dict(state_dict["train_loader"])
        for name, value in state_dict.get("model_attributes", {}).items():
            setattr(self.checkpointer.model, name, value)

