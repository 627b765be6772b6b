"""Loading a detector checkpoint for evaluation without silently random head weights."""
from detectron2.checkpoint import DetectionCheckpointer

# Modules whose weights only a trained detector checkpoint provides (the assigner's: a learnt
# centre prior; "center_prior." in checkpoints written before it moved into the assigner).
_DETECTOR_PREFIXES = ("head.", "assigner.", "center_prior.")


class EvaluationCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses a detector checkpoint which leaves part of the
    head untrained.

    When a checkpoint of a trained detector (it has ``head.*`` weights) lacks some of this
    model's head weights, or has them with another shape, Detectron2 logs a warning and keeps
    the random initial values: fine when fine-tuning, silently wrong numbers when evaluating.
    Typical causes: ``MODEL.DW.BOX_REFINEMENT True`` for a checkpoint trained without the
    refinement branch, a ``MODEL.DW.NUM_CLASSES`` that differs from the checkpoint's, or a
    ``MODEL.ASSIGNER.NAME`` with learnt parameters (AutoAssign) for a checkpoint trained with
    another scheme.
    Backbone-only checkpoints (ImageNet weights) are not detector checkpoints and load as usual.
    """

    def load(self, path, *args, **kwargs):
        self._loading_path = path
        return super().load(path, *args, **kwargs)

    def _load_model(self, checkpoint):
        checkpoint_keys = set(checkpoint.get("model", {}))
        incompatible = super()._load_model(checkpoint)
        if not any(k.startswith(_DETECTOR_PREFIXES) for k in checkpoint_keys):
            return incompatible
        untrained = sorted(
            [k for k in incompatible.missing_keys if k.startswith(_DETECTOR_PREFIXES)]
            + [k for k, *_ in incompatible.incorrect_shapes if k.startswith(_DETECTOR_PREFIXES)]
        )
        if untrained:
            raise ValueError(
                f"{getattr(self, '_loading_path', 'the checkpoint')}: it is a detector checkpoint, "
                f"but it has no weights of the right shape for {', '.join(untrained)}; "
                "evaluating would use their random initial values. Make the config match the "
                "checkpoint (for example MODEL.DW.BOX_REFINEMENT False for a checkpoint trained "
                "without box refinement, the checkpoint's MODEL.DW.NUM_CLASSES, or its "
                "MODEL.ASSIGNER.NAME)."
            )
        return incompatible
