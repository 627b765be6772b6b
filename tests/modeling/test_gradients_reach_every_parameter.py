"""Every trainable parameter gets a gradient in every training step, images with GT boxes or
not: DistributedDataParallel waits for a gradient of each parameter from each process, so a
process whose images hold no GT box must still reach all of them (with zeros), or the other
processes hang in the gradient all-reduce."""
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dw_d2 import add_dw_config

BUILTIN = Path(__file__).resolve().parents[2] / "configs" / "Builtin"


def tiny_detector(config_name):
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(BUILTIN / config_name))
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "GN", "MODEL.DW.NUM_CONVS", "1"])
    torch.manual_seed(0)
    return build_model(cfg).train()


def image(num_boxes):
    instances = Instances((64, 64))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 40.0, 50.0]] * num_boxes).reshape(-1, 4))
    instances.gt_classes = torch.zeros(num_boxes, dtype=torch.long)
    pixels = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    return {"image": pixels, "instances": instances, "height": 64, "width": 64}


@pytest.mark.parametrize("config_name", ["dw_R_18_FPN_shapes.yaml",
                                         "autoassign_R_18_FPN_shapes.yaml"])
def test_every_trainable_parameter_gets_a_gradient_without_gt_boxes(config_name):
    model = tiny_detector(config_name)
    losses = model([image(num_boxes=0), image(num_boxes=0)])
    sum(losses.values()).backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(name for name, p in model.named_parameters()
                     if p.requires_grad and p.grad is None)
    assert len(trainable) > 50
    assert missing == [], f"no gradient (so DistributedDataParallel would hang): {missing}"
    assert all(torch.isfinite(loss) for loss in losses.values())
