"""A new label-assignment scheme, written in this file alone: a config node, a registered
module, and the YAML file tests/configs/inside_box_shapes.yaml. It trains through dw-d2's
Trainer on the built-in dataset, then predicts. The README's "Adding an assignment scheme"
walks through the same example."""
import pytest
import torch
from detectron2.config import CfgNode, configurable, get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from dw_d2 import ASSIGNER_REGISTRY, add_dw_config
from dw_d2.assign.candidates import find_candidate_pairs
from dw_d2.assign.pipeline import gather_pairs, pair_overlaps, prepare_batch
from dw_d2.engine import Trainer
from tests.helpers import NUM_CLASSES, REPO, TINY


def add_inside_box_config(cfg):
    """The scheme's keys, born here as dw-d2's are in ``add_dw_config``."""
    cfg.MODEL.ASSIGNER.INSIDE_BOX = CfgNode()
    cfg.MODEL.ASSIGNER.INSIDE_BOX.BOX_LOSS_WEIGHT = 1.0


@ASSIGNER_REGISTRY.register()
class InsideBox(nn.Module):
    """Every point strictly inside a GT box is a positive of the box's class, with weight 1;
    every other (point, class) is a negative. Focal loss on the class scores, GIoU loss on the
    positives' boxes."""

    reference_point_offset = 0.5  # the point of cell (y, x) sits at ((x + 0.5) s, (y + 0.5) s)

    @configurable
    def __init__(self, *, box_loss_weight: float = 1.0):
        super().__init__()
        self.box_loss_weight = box_loss_weight

    @classmethod
    def from_config(cls, cfg):
        return {"box_loss_weight": cfg.MODEL.ASSIGNER.INSIDE_BOX.BOX_LOSS_WEIGHT}

    def forward(self, points, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes):
        batch = prepare_batch(points, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes)
        pairs = find_candidate_pairs(batch.points, batch.gt)  # points strictly inside GT boxes
        pair = gather_pairs(batch, pairs)  # the predictions and GT boxes at those pairs
        _, giou = pair_overlaps(pair)
        cls_logits = batch.cls_logits.reshape(-1)
        targets = torch.zeros_like(cls_logits).index_fill(0, pair.score_entry, 1.0)
        num_positives = max(pairs.num_pairs, 1)
        return {
            "loss_cls": sigmoid_focal_loss(cls_logits, targets, reduction="sum") / num_positives,
            "loss_box": self.box_loss_weight * (1 - giou).sum() / num_positives,
        }


@pytest.mark.slow
def test_a_scheme_defined_in_one_file_trains_and_predicts(tmp_path):
    cfg = get_cfg()
    add_dw_config(cfg)
    add_inside_box_config(cfg)
    cfg.merge_from_file(str(REPO / "tests" / "configs" / "inside_box_shapes.yaml"))
    # Scores start near 0.02 x 0.5: a threshold below that leaves detections to check.
    cfg.merge_from_list([*TINY, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()",
                         "MODEL.DW.SCORE_THRESH_TEST", "0.005", "OUTPUT_DIR", str(tmp_path)])
    cfg.freeze()

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    assert isinstance(model.assigner, InsideBox) and model.assigner.box_loss_weight == 2.0
    for name in ("loss_cls", "loss_box"):
        values = [value for value, _ in trainer.storage.history(name).values()]
        assert len(values) == 4 and all(torch.isfinite(torch.tensor(values))), name

    record = next(r for r in DatasetCatalog.get("dw_shapes_val") if r.get("annotations"))
    mapped = DatasetMapper(cfg, is_train=False)(record)
    model.eval()
    with torch.no_grad():
        instances = model([mapped])[0]["instances"]
    assert instances.image_size == (record["height"], record["width"])
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert boxes[:, 0::2].max() <= record["width"] and boxes[:, 1::2].max() <= record["height"]
    assert torch.all(instances.scores[:-1] >= instances.scores[1:])
    assert instances.pred_classes.min() >= 0 and instances.pred_classes.max() < NUM_CLASSES
