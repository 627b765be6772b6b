"""The COCO configs repeat the official experiments' recipes."""
import pytest

from tests.helpers import REPO, make_cfg

COCO = REPO / "configs" / "COCO-Detection"
EPOCH = 7330  # iterations per epoch of COCO train2017 at 16 images (Base-DW-official.yaml)

# config -> (scheme, depth, box refinement, DCN, multi-scale, epochs)
OFFICIAL = {
    "dw_R_50_FPN_1x.yaml": ("DW", 50, True, False, False, 12),
    "dw_R_50_FPN_1x_norefine.yaml": ("DW", 50, False, False, False, 12),
    "dw_R_50_FPN_ms_2x.yaml": ("DW", 50, True, False, True, 24),
    "dw_R_50_FPN_dcn_ms_2x.yaml": ("DW", 50, True, True, True, 24),
    "dw_R_101_FPN_ms_2x_norefine.yaml": ("DW", 101, False, False, True, 24),
    "autoassign_R_50_FPN_1x.yaml": ("AutoAssign", 50, False, False, False, 12),
}


@pytest.mark.parametrize("config", sorted(OFFICIAL))
def test_official_recipe(config, tmp_path):
    scheme, depth, refinement, dcn, multi_scale, epochs = OFFICIAL[config]
    cfg = make_cfg(COCO / config, tmp_path)
    assert cfg.MODEL.ASSIGNER.NAME == scheme
    assert cfg.MODEL.RESNETS.DEPTH == depth
    assert cfg.MODEL.DW.BOX_REFINEMENT == refinement
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2  # frozen_stages=1
    if scheme == "DW":  # torchvision's pytorch-style ResNet, BN statistics frozen, RGB input
        assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1
        assert cfg.MODEL.RESNETS.NORM == "FrozenStatsBN"
        assert cfg.INPUT.FORMAT == "RGB"
        assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
        assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
        assert cfg.MODEL.WEIGHTS == f"weights/torchvision-R-{depth}.pth"
        assert cfg.MODEL.BACKBONE.NAME == "build_dw_resnet_fpn_backbone"
    else:  # MMDetection's AutoAssign: caffe-style, frozen BN, BGR with std 1, P6 from C5
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1
        assert cfg.MODEL.RESNETS.NORM == "FrozenBN"
        assert cfg.INPUT.FORMAT == "BGR"
        assert cfg.MODEL.PIXEL_MEAN == [102.9801, 115.9465, 122.7717]
        assert cfg.MODEL.PIXEL_STD == [1.0, 1.0, 1.0]
        assert cfg.MODEL.BACKBONE.NAME == "build_retinanet_resnet_fpn_backbone"
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.SOLVER.MAX_ITER == epochs * EPOCH
    decays = (8, 11) if epochs == 12 else (16, 22)
    assert tuple(cfg.SOLVER.STEPS) == tuple(e * EPOCH for e in decays)
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR) == (1000, 0.001)
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, dcn, dcn, dcn]
    assert cfg.MODEL.DW.DCN_ON_LAST_CONV == dcn
    if dcn:
        assert cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 1
    if multi_scale:
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (480, 960)
        assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
    else:
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
    assert cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert (cfg.MODEL.DW.SCORE_THRESH_TEST, cfg.MODEL.DW.TOPK_CANDIDATES_TEST,
            cfg.MODEL.DW.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE) == (0.05, 1000, 0.6, 100)


def test_every_coco_config_is_an_official_recipe_or_says_it_is_not():
    configs = {p.name for p in COCO.glob("*.yaml")} - {"Base-DW-official.yaml"}
    assert configs - set(OFFICIAL) == {"dw_R_50_FPN_1x_caffe.yaml"}
    assert "Not an official recipe" in (COCO / "dw_R_50_FPN_1x_caffe.yaml").read_text()
