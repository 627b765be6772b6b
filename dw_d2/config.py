"""Config keys of dw-d2, added to a Detectron2 config by :func:`add_dw_config`."""
from detectron2.config import CfgNode as CN


def add_dw_config(cfg):
    """Add the ``MODEL.DW`` (head and inference) and ``MODEL.ASSIGNER`` (label assignment) keys.

    Every default is the official implementation's value; the configs in ``configs/`` only
    override what differs from Detectron2's own defaults.
    """
    cfg.MODEL.DW = CN()
    cfg.MODEL.DW.NUM_CLASSES = 80
    cfg.MODEL.DW.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.DW.NUM_CONVS = 4
    cfg.MODEL.DW.NORM = "GN"
    # Initial foreground probability of the classification conv (bias = -log((1 - p) / p)).
    cfg.MODEL.DW.PRIOR_PROB = 0.02
    cfg.MODEL.DW.DISTANCE_BIAS_INIT = 4.0
    # DW's box refinement branch (an 8-channel offset conv on the regression tower).
    cfg.MODEL.DW.BOX_REFINEMENT = True

    # Inference.
    cfg.MODEL.DW.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.DW.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.DW.NMS_THRESH_TEST = 0.6

    _add_assigner_config(cfg)
    _add_official_model_config(cfg)


def _add_official_model_config(cfg):
    """The layers and the test path of the official models that the keys above do not cover:
    DCN in the head towers and the rule that ranks candidates at inference. (The ResNet's
    frozen-statistics BN is ``MODEL.RESNETS.NORM "FrozenStatsBN"``, its deformable stages
    Detectron2's ``MODEL.RESNETS.DEFORM_*`` keys; see dw_d2.modeling.resnet.)"""
    # The last conv of each head tower as a modulated deformable conv (DCNv2) predicting its own
    # offsets: the official DCN model's heads (MMDetection's dcn_on_last_conv).
    cfg.MODEL.DW.DCN_ON_LAST_CONV = False
    # How inference ranks the (point, class) candidates of a level before NMS, one of
    # dw_d2.modeling.INFERENCE_SCORES:
    #   "joint": threshold and top-k on sigmoid(cls) * sigmoid(ctr) (the official DW test path);
    #   "class_then_joint": threshold and top-k on sigmoid(cls) alone, then the kept scores are
    #     multiplied by sigmoid(ctr) before NMS (MMDetection's FCOS and AutoAssign test path);
    #   "": the assignment scheme's reference (DW: joint; AutoAssign: class_then_joint).
    cfg.MODEL.DW.INFERENCE_SCORE = ""


def _add_assigner_config(cfg):
    """``MODEL.ASSIGNER``: the label-assignment scheme, its common keys, then one node of
    hyper-parameters per built-in scheme (a scheme added elsewhere brings its own node)."""
    cfg.MODEL.ASSIGNER = CN()
    # The scheme, by its name in dw_d2.ASSIGNER_REGISTRY: "DW" or "AutoAssign" built in
    # (matched case-insensitively).
    cfg.MODEL.ASSIGNER.NAME = "DW"
    # Where the point of feature cell (y, x) sits: ((x + o) * s, (y + o) * s). None means the
    # scheme's reference value: 0.5 for DW, 0.0 for AutoAssign (MMDetection's generator).
    cfg.MODEL.ASSIGNER.POINT_OFFSET = None
    # Where a point is a candidate of several GT boxes of the same class, which negative
    # weight wins: "last_gt" (the official code's behaviour on CPU: the highest GT index) or
    # "min" (the smallest of them; independent of the order of the GT boxes).
    cfg.MODEL.ASSIGNER.DUPLICATE_RULE = "last_gt"

    # DW (official values).
    cfg.MODEL.ASSIGNER.DW = CN()
    cfg.MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA = 1.11
    cfg.MODEL.ASSIGNER.DW.POS_NUM_EXP = 5.0  # exponent of the positive weight's numerator
    cfg.MODEL.ASSIGNER.DW.POS_DEN_EXP = 3.0  # exponent of its denominator
    cfg.MODEL.ASSIGNER.DW.LOC_BETA = 5.0  # p_loc = exp(-beta * (1 - GIoU))
    cfg.MODEL.ASSIGNER.DW.NEG_IOU_THRESH = 0.5
    cfg.MODEL.ASSIGNER.DW.NEG_GAMMA = 2.0
    cfg.MODEL.ASSIGNER.DW.POS_LOSS_WEIGHT = 0.25
    cfg.MODEL.ASSIGNER.DW.LOC_LOSS_WEIGHT = 0.25

    # AutoAssign (MMDetection 2.25's values).
    cfg.MODEL.ASSIGNER.AUTOASSIGN = CN()
    cfg.MODEL.ASSIGNER.AUTOASSIGN.GIOU_WEIGHT = 5.0  # p_loc = exp(-5 * (1 - GIoU))
    cfg.MODEL.ASSIGNER.AUTOASSIGN.CONFIDENCE_TEMPERATURE = 3.0
    cfg.MODEL.ASSIGNER.AUTOASSIGN.POS_LOSS_WEIGHT = 0.25
    cfg.MODEL.ASSIGNER.AUTOASSIGN.NEG_LOSS_WEIGHT = 0.75
    cfg.MODEL.ASSIGNER.AUTOASSIGN.CENTER_LOSS_WEIGHT = 0.75
    # MMDetection's option for GT boxes that contain no point: their top-k points by centre
    # prior become candidates.
    cfg.MODEL.ASSIGNER.AUTOASSIGN.FORCE_TOPK = False
    cfg.MODEL.ASSIGNER.AUTOASSIGN.TOPK = 9

    # Keys of earlier dw-d2 configs: merging one names the key that replaces it.
    renamed = {"MODEL.DW.ASSIGNER": "MODEL.ASSIGNER.NAME",
               "MODEL.DW.POINT_OFFSET": "MODEL.ASSIGNER.POINT_OFFSET",
               "MODEL.DW.DUPLICATE_RULE": "MODEL.ASSIGNER.DUPLICATE_RULE",
               "MODEL.AUTOASSIGN": "MODEL.ASSIGNER.AUTOASSIGN"}
    for key in cfg.MODEL.ASSIGNER.DW:
        renamed[f"MODEL.DW.{key}"] = f"MODEL.ASSIGNER.DW.{key}"
    for key in cfg.MODEL.ASSIGNER.AUTOASSIGN:  # as command-line options name them
        renamed[f"MODEL.AUTOASSIGN.{key}"] = f"MODEL.ASSIGNER.AUTOASSIGN.{key}"
    for old, new in renamed.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(
                old, new, "dw-d2's label-assignment keys are under MODEL.ASSIGNER")

    _add_pretrained_backbone_and_schedule_config(cfg)


def _add_pretrained_backbone_and_schedule_config(cfg):
    """``MODEL.TIMM`` (ImageNet-pretrained timm backbones, ``build_dw_timm_fpn_backbone``) and
    ``SOLVER`` schedule keys that follow ``SOLVER.MAX_ITER``."""
    cfg.MODEL.TIMM = CN()
    # Any timm model that supports features_only.
    cfg.MODEL.TIMM.NAME = "efficientnet_lite0"
    # Which of timm's feature maps feed the FPN (all of them, finest first); strides and
    # channels come from timm's feature_info. For efficientnet_lite0, (2, 3, 4) are strides
    # 8/16/32 with 40/112/320 channels: the FPN then outputs p3-p7.
    cfg.MODEL.TIMM.OUT_INDICES = [2, 3, 4]
    # Load ImageNet weights: MODEL.TIMM.WEIGHTS_FILE if set, else weights an installed package
    # ships (efficientnet_lite0), else timm's own download.
    cfg.MODEL.TIMM.PRETRAINED = True
    # A state_dict of the whole timm classifier (timm's names, or its tensors in timm's order).
    cfg.MODEL.TIMM.WEIGHTS_FILE = ""
    # The pretrained BatchNorm layers: "BN" (keep training) or "FrozenBN" (ImageNet
    # statistics and affine parameters fixed).
    cfg.MODEL.TIMM.NORM = "BN"
    # Stages not trained (timm's feature_info order; 1 = the stride-2 stage, 2 = up to
    # stride 4, ...); 0 trains the whole network.
    cfg.MODEL.TIMM.FREEZE_AT = 0

    # LR steps and warm-up as fractions of SOLVER.MAX_ITER (dw-d2's Trainer), so that
    # overriding MAX_ITER keeps the schedule's shape; Detectron2's SOLVER.STEPS and
    # SOLVER.WARMUP_ITERS are iteration counts that do not follow it. When set (non-empty,
    # >= 0), they replace SOLVER.STEPS / SOLVER.WARMUP_ITERS.
    cfg.SOLVER.STEP_FRACTIONS = ()
    cfg.SOLVER.WARMUP_FRACTION = -1.0
