"""The Trainer's COCO evaluation scores every detection the model keeps, also on images with
more than 100 objects (pycocotools' own limit is 100 detections per image)."""
import json

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from dw_d2.engine import Trainer
from tests.helpers import RETINANET_CONFIG, make_cfg

NUM_OBJECTS = 150  # one image holds more objects than COCO's 100 detections


@pytest.fixture
def crowded_dataset(tmp_path):
    """One 400 x 400 image with 150 disjoint 20 x 20 boxes of one class (a COCO JSON; the
    image file is never read)."""
    boxes = [[(i % 15) * 26.0, (i // 15) * 26.0, 20.0, 20.0] for i in range(NUM_OBJECTS)]
    coco = {
        "images": [{"id": 1, "file_name": "crowded.png", "width": 400, "height": 400}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box,
                         "area": 400.0, "iscrowd": 0} for i, box in enumerate(boxes)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    json_file = tmp_path / "crowded.json"
    json_file.write_text(json.dumps(coco))
    name = "dw_d2_test_crowded"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    yield name, boxes
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _perfect_detections(boxes):
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
    # Decreasing scores: the evaluator keeps the best maxDets of them.
    scores = torch.linspace(0.99, 0.5, len(boxes))
    return Instances((400, 400), pred_boxes=Boxes(xyxy), scores=scores,
                     pred_classes=torch.zeros(len(boxes), dtype=torch.int64))


@pytest.mark.parametrize("detections_per_image, expected_ap", [
    (300, 100.0),  # every object found: AP 100
    (100, None),  # COCO's standard limit: at most 100 of the 150 objects can count
])
def test_ap_counts_detections_per_image(tmp_path, crowded_dataset, detections_per_image,
                                        expected_ap):
    name, boxes = crowded_dataset
    cfg = make_cfg(RETINANET_CONFIG, tmp_path, "MODEL.RETINANET.NUM_CLASSES", "1",
                   "TEST.DETECTIONS_PER_IMAGE", str(detections_per_image))
    evaluator = Trainer.build_evaluator(cfg, name)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": _perfect_detections(boxes)}])
    ap = evaluator.evaluate()["bbox"]["AP"]
    if expected_ap is not None:
        assert ap == pytest.approx(expected_ap)
    else:
        # Recall stops at 100 / 150: COCO's 101-point precision is 0 beyond it.
        assert ap == pytest.approx(100.0 * 67 / 101, abs=0.5)
