"""Models with the official structure and parameter names of DW (strongwolf/DW, MMDetection 2.x)
and MMDetection 2.x's AutoAssign, written plainly from their forward and test code, and saved as
MMDetection saves them: what the equivalence tests convert and compare dw-d2 with.

The pieces, as the official code builds them:

* backbone: torchvision's ResNet (MMDetection's ResNet has the same names: ``conv1``, ``bn1``,
  ``layer{1-4}.{i}.conv{1-3}`` / ``bn{1-3}`` / ``downsample.{0,1}``), BN with running
  statistics (``norm_eval``); ``style='caffe'`` moves a stage's stride into the first 1x1 conv;
  DCN stages replace ``conv2`` by mmcv's ``ModulatedDeformConv2dPack`` (``conv2.weight``,
  ``conv2.conv_offset``) computed with ``torchvision.ops.deform_conv2d``;
* neck: MMDetection's FPN with ``start_level=1``, ``num_outs=5``, ``relu_before_extra_convs``;
  P6 from P5's output (``add_extra_convs='on_output'``, DW) or from C5 (``'on_input'``,
  AutoAssign); nearest upsampling to the finer level's size;
* head: ``AnchorFreeHead`` towers (``{cls,reg}_convs.{i}.conv`` with bias, ``.gn``, ReLU),
  ``conv_cls``, ``conv_reg``, ``conv_centerness`` on the regression tower, ``scales.{l}.scale``,
  DW's ``reg_offset`` and box refinement (``DWHead.forward_single``), the centre prior's
  ``mean`` / ``sigma``;
* test path (``_get_bboxes_single`` + ``_bbox_post_process``): per level, threshold then top-k
  (``filter_scores_and_topk``) on sigmoid(cls) * sigmoid(ctr) (DW) or sigmoid(cls) alone
  (AutoAssign), boxes decoded and clipped to the image, scores times sigmoid(ctr), class-wise
  NMS (mmcv's ``batched_nms``: boxes offset per class, one NMS), 100 per image.

Where the official code casts to float32 (``scale(bbox_pred).float()``, against float16
overflow), this code keeps the input's precision, so that a float64 comparison stays exact.
"""
import math
from collections import OrderedDict
from typing import List, NamedTuple, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d, nms

STRIDES = (8, 16, 32, 64, 128)
COCO_CLASSES = 80
FPN_CHANNELS = 256
# MMDetection's img_norm_cfg of each recipe: (mean, std, to_rgb); images load as BGR (cv2).
IMG_NORM = {
    "DW": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True),
    "AutoAssign": ((102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0), False),
}


class OfficialLayout(NamedTuple):
    scheme: str  # "DW" or "AutoAssign"
    depth: int = 50
    box_refinement: bool = True
    dcn: bool = False  # DCNv2 in layer2-4 and the last conv of each head tower
    exp_name: str = "dw_r50_fpn_1x_coco.py"

    @property
    def style(self) -> str:
        return "caffe" if self.scheme == "AutoAssign" else "pytorch"

    @property
    def prior_offset(self) -> float:
        return 0.0 if self.scheme == "AutoAssign" else 0.5


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class MMCVModulatedDeformConvPack(nn.Module):
    """mmcv's ``ModulatedDeformConv2dPack`` (DCNv2): offsets and mask from ``conv_offset``."""

    def __init__(self, in_channels, out_channels, stride=1, bias=True):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, 27, 3, stride=stride, padding=1, bias=True)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return deform_conv2d(x, offset, self.weight, self.bias, stride=(self.stride,) * 2,
                             padding=(1, 1), mask=mask)


class ConvModule(nn.Module):
    """mmcv's ``ConvModule``: ``conv``, then ``gn`` and ReLU when it has a norm."""

    def __init__(self, conv, gn=None):
        super().__init__()
        self.conv = conv
        if gn is not None:
            self.gn = gn

    def forward(self, x):
        x = self.conv(x)
        if hasattr(self, "gn"):
            x = F.relu(self.gn(x))
        return x


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.scale


class CenterPrior(nn.Module):
    def __init__(self, mean, sigma, learnable):
        super().__init__()
        self.mean = nn.Parameter(mean, requires_grad=learnable)
        self.sigma = nn.Parameter(sigma, requires_grad=learnable)


def official_resnet(depth: int, style: str, dcn: bool) -> nn.Module:
    resnet = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]()
    del resnet.fc, resnet.avgpool
    for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
        first = stage[0]
        if style == "caffe":  # the stride in the first 1x1 conv
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
        if dcn:
            for block in stage:
                block.conv2 = MMCVModulatedDeformConvPack(
                    block.conv2.in_channels, block.conv2.out_channels,
                    stride=block.conv2.stride[0], bias=False)
    return resnet


class OfficialFPN(nn.Module):
    def __init__(self, p6_from_c5: bool):
        super().__init__()
        self.p6_from_c5 = p6_from_c5
        self.lateral_convs = nn.ModuleList(
            ConvModule(nn.Conv2d(c, FPN_CHANNELS, 1)) for c in (512, 1024, 2048))
        self.fpn_convs = nn.ModuleList(
            [ConvModule(nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1)) for _ in range(3)]
            + [ConvModule(nn.Conv2d(2048 if p6_from_c5 else FPN_CHANNELS, FPN_CHANNELS, 3,
                                    stride=2, padding=1)),
               ConvModule(nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, stride=2, padding=1))])

    def forward(self, inputs):  # C3, C4, C5
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [self.fpn_convs[i](laterals[i]) for i in range(3)]
        outs.append(self.fpn_convs[3](inputs[-1] if self.p6_from_c5 else outs[-1]))
        outs.append(self.fpn_convs[4](F.relu(outs[-1])))
        return outs


def grid_priors(height, width, stride, offset, dtype):
    """MMDetection's ``MlvlPointGenerator.single_level_grid_priors``: (H * W, 2) x, y."""
    shift_x = ((torch.arange(width) + offset) * stride).to(dtype)
    shift_y = ((torch.arange(height) + offset) * stride).to(dtype)
    xx = shift_x.repeat(len(shift_y))
    yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
    return torch.stack([xx, yy], dim=-1)


def distance2bbox(points, distance, max_shape=None):
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    bboxes = torch.stack([x1, y1, x2, y2], -1)
    if max_shape is not None:
        bboxes[:, 0::2] = bboxes[:, 0::2].clamp(min=0, max=max_shape[1])
        bboxes[:, 1::2] = bboxes[:, 1::2].clamp(min=0, max=max_shape[0])
    return bboxes


def bbox2distance(points, bbox):
    return torch.stack([points[:, 0] - bbox[:, 0], points[:, 1] - bbox[:, 1],
                        bbox[:, 2] - points[:, 0], bbox[:, 3] - points[:, 1]], -1)


class OfficialHead(nn.Module):
    def __init__(self, layout: OfficialLayout, num_classes=COCO_CLASSES, stacked_convs=4):
        super().__init__()
        self.layout = layout
        self.num_classes = num_classes

        def tower():
            convs = nn.ModuleList()
            for i in range(stacked_convs):
                if layout.dcn and i == stacked_convs - 1:
                    conv = MMCVModulatedDeformConvPack(FPN_CHANNELS, FPN_CHANNELS)
                else:
                    conv = nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1, bias=True)
                convs.append(ConvModule(conv, nn.GroupNorm(32, FPN_CHANNELS)))
            return convs

        self.cls_convs = tower()
        self.reg_convs = tower()
        self.conv_cls = nn.Conv2d(FPN_CHANNELS, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(FPN_CHANNELS, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(FPN_CHANNELS, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in STRIDES)
        if layout.box_refinement:
            self.reg_offset = nn.Conv2d(FPN_CHANNELS, 8, 3, padding=1)
        if layout.scheme == "DW":
            self.center_prior = CenterPrior(torch.zeros(num_classes, 2),
                                            torch.ones(num_classes, 2) + 0.11, learnable=False)
        else:
            self.center_prior = CenterPrior(torch.zeros(num_classes, 2),
                                            torch.ones(num_classes, 2), learnable=True)

    def forward_single(self, x, level):
        """(cls_score, bbox_pred, centerness) of one level, as ``DWHead.forward_single`` /
        ``AutoAssignHead.forward_single``."""
        stride = STRIDES[level]
        b, _, h, w = x.shape
        cls_feat, reg_feat = x, x
        for layer in self.cls_convs:
            cls_feat = layer(cls_feat)
        for layer in self.reg_convs:
            reg_feat = layer(reg_feat)
        cls_score = self.conv_cls(cls_feat)
        bbox_pred = self.conv_reg(reg_feat)
        centerness = self.conv_centerness(reg_feat)
        bbox_pred = F.relu(self.scales[level](bbox_pred)) * stride
        if self.layout.box_refinement:
            reg_dist = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
            points = grid_priors(h, w, stride, self.layout.prior_offset, x.dtype).repeat(b, 1)
            decoded = distance2bbox(points, reg_dist).reshape(b, h, w, 4).permute(0, 3, 1, 2)
            reg_offset = self.reg_offset(reg_feat)
            d = bbox_pred / stride
            reg_offset = torch.stack([reg_offset[:, 0], reg_offset[:, 1] - d[:, 0],
                                      reg_offset[:, 2] - d[:, 1], reg_offset[:, 3],
                                      reg_offset[:, 4], reg_offset[:, 5] + d[:, 2],
                                      reg_offset[:, 6] + d[:, 3], reg_offset[:, 7]], 1)
            # deform_sampling: a 1x1 deformable conv with unit weights, one group per channel.
            weight = decoded.new_ones(4, 1, 1, 1)
            sampled = deform_conv2d(decoded.contiguous(), reg_offset.contiguous(), weight)
            bbox_pred = F.relu(bbox2distance(points, sampled.permute(0, 2, 3, 1).reshape(-1, 4))
                               .reshape(b, h, w, 4).permute(0, 3, 1, 2).contiguous())
        return cls_score, bbox_pred, centerness


class OfficialDetector(nn.Module):
    """``backbone``, ``neck``, ``bbox_head``: MMDetection's single-stage detector."""

    def __init__(self, layout: OfficialLayout):
        super().__init__()
        self.layout = layout
        self.backbone = official_resnet(layout.depth, layout.style, layout.dcn)
        self.neck = OfficialFPN(p6_from_c5=layout.scheme == "AutoAssign")
        self.bbox_head = OfficialHead(layout)

    def backbone_features(self, x) -> List[Tensor]:
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        c2 = r.layer1(x)
        c3 = r.layer2(c2)
        c4 = r.layer3(c3)
        return [c3, c4, r.layer4(c4)]

    def forward(self, x):
        """Per level (cls_score, bbox_pred, centerness), lists over the levels."""
        feats = self.neck(self.backbone_features(x))
        outs = [self.bbox_head.forward_single(f, level) for level, f in enumerate(feats)]
        return tuple(list(t) for t in zip(*outs))

    @torch.no_grad()
    def detect(self, outputs, img_shapes, score_thr=0.05, nms_pre=1000, iou_threshold=0.6,
               max_per_img=100):
        """The test path (``get_bboxes``) on the head's ``outputs`` (what :meth:`forward`
        returns): per image (boxes (k, 4), scores (k,), labels (k,)) in the input frame."""
        cls_scores, bbox_preds, centernesses = outputs
        dtype = bbox_preds[0].dtype
        priors = [grid_priors(c.shape[2], c.shape[3], s, self.layout.prior_offset, dtype)
                  for c, s in zip(cls_scores, STRIDES)]
        return [self._get_bboxes_single([c[i] for c in cls_scores], [b[i] for b in bbox_preds],
                                        [o[i] for o in centernesses], priors, img_shape,
                                        score_thr, nms_pre, iou_threshold, max_per_img)
                for i, img_shape in enumerate(img_shapes)]

    def _get_bboxes_single(self, cls_score_list, bbox_pred_list, score_factor_list, priors_list,
                           img_shape, score_thr, nms_pre, iou_threshold, max_per_img):
        mlvl_bboxes, mlvl_scores, mlvl_labels, mlvl_factors = [], [], [], []
        for cls_score, bbox_pred, score_factor, priors in zip(
                cls_score_list, bbox_pred_list, score_factor_list, priors_list):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            score_factor = score_factor.permute(1, 2, 0).reshape(-1).sigmoid()
            scores = cls_score.permute(1, 2, 0).reshape(-1, self.bbox_head.num_classes).sigmoid()
            ranked = scores * score_factor[:, None] if self.layout.scheme == "DW" else scores
            _, labels, keep_idxs = filter_scores_and_topk(ranked, score_thr, nms_pre)
            mlvl_scores.append(scores[keep_idxs, labels])
            mlvl_labels.append(labels)
            mlvl_bboxes.append(distance2bbox(priors[keep_idxs], bbox_pred[keep_idxs], img_shape))
            mlvl_factors.append(score_factor[keep_idxs])
        bboxes = torch.cat(mlvl_bboxes)
        scores = torch.cat(mlvl_scores) * torch.cat(mlvl_factors)
        labels = torch.cat(mlvl_labels)
        keep = mmcv_batched_nms(bboxes, scores, labels, iou_threshold)[:max_per_img]
        return bboxes[keep], scores[keep], labels[keep]


def filter_scores_and_topk(scores, score_thr, topk):
    """MMDetection 2.x's ``filter_scores_and_topk``: (scores, labels, point indices)."""
    valid_mask = scores > score_thr
    scores = scores[valid_mask]
    valid_idxs = torch.nonzero(valid_mask)
    num_topk = min(topk, valid_idxs.size(0))
    scores, idxs = scores.sort(descending=True)
    topk_idxs = valid_idxs[idxs[:num_topk]]
    keep_idxs, labels = topk_idxs.unbind(dim=1)
    return scores[:num_topk], labels, keep_idxs


def mmcv_batched_nms(boxes, scores, labels, iou_threshold):
    """mmcv's ``batched_nms`` for fewer than 10,000 boxes: the boxes of each class moved apart
    by (max coordinate + 1) * label, then one NMS; kept indices by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# --------------------------------------------------------------------------------------------
# Random weights and MMDetection-style checkpoints
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: OfficialDetector, seed: int = 0, calibration_size=(128, 160)):
    """Random weights in realistic ranges: BN statistics measured on random images (so that
    activations neither vanish nor explode through the ResNet), random BN/GN affine parameters,
    class biases high enough that many candidates pass the 0.05 threshold, distances of a few
    strides, refinement and DCN offsets of a fraction of a cell to a few cells. The model stays
    float32, as a saved checkpoint holds it."""
    generator = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float64) * std + mean)

    def uniform(t, low, high):
        t.copy_(low + (high - low) * torch.rand(t.shape, generator=generator,
                                                dtype=torch.float64))

    layout = model.layout
    backbone = model.backbone
    # Offsets of about half a pixel that vary a little with the input: a DCN whose offsets
    # follow its input strongly makes a random network chaotic.
    for module in backbone.modules():
        if isinstance(module, MMCVModulatedDeformConvPack):
            normal(module.conv_offset.weight, 1e-4)
            normal(module.conv_offset.bias, 0.5)
    # BN statistics of random images (cumulative averages over one batch).
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    backbone.train()
    images = torch.randn(2, 3, *calibration_size, generator=generator)
    model.backbone_features(images)
    backbone.eval()
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            uniform(module.weight, 0.5, 1.5)
            normal(module.bias, 0.1)
            module.num_batches_tracked.fill_(int(torch.randint(1, 10 ** 5, (1,),
                                                               generator=generator)))
    head = model.bbox_head
    for module in head.modules():
        if isinstance(module, nn.GroupNorm):
            uniform(module.weight, 0.5, 1.5)
            normal(module.bias, 0.1)
        elif isinstance(module, (nn.Conv2d, MMCVModulatedDeformConvPack)):
            normal(module.weight, 0.01)
            if module.bias is not None:
                normal(module.bias, 0.1)
    normal(head.conv_cls.weight, 0.05)
    uniform(head.conv_cls.bias, -3.0, -1.0)
    uniform(head.conv_reg.bias, 1.0, 3.0)
    normal(head.conv_centerness.weight, 0.02)
    for scale in head.scales:
        uniform(scale.scale, 0.5, 1.5)
    if layout.box_refinement:
        normal(head.reg_offset.bias, 0.5)
    for module in head.modules():
        if isinstance(module, MMCVModulatedDeformConvPack):
            normal(module.conv_offset.weight, 1e-3)
            normal(module.conv_offset.bias, 0.5)
    if layout.scheme == "AutoAssign":
        normal(head.center_prior.mean, 0.2)
        uniform(head.center_prior.sigma, 0.8, 1.5)
    return model.eval()


def load_official(path, layout: OfficialLayout) -> OfficialDetector:
    """The official-structure model of ``layout`` with the weights of an MMDetection-style
    checkpoint (every tensor must fit)."""
    model = OfficialDetector(layout)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model.eval()


def config_text(layout: OfficialLayout) -> str:
    """A short stand-in for the config text MMDetection stores in ``meta["config"]``."""
    if layout.scheme == "AutoAssign":
        neck = "add_extra_convs=True, extra_convs_on_inputs=True"
        head = "type='AutoAssignHead', norm_on_bbox=True"
    else:
        neck = "add_extra_convs='on_output'"
        head = (f"type='DWHead', reg_refine={layout.box_refinement}"
                + (", dcn_on_last_conv=True" if layout.dcn else ""))
    dcn = ("dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False), "
           "stage_with_dcn=(False, True, True, True), " if layout.dcn else "")
    detector = "AutoAssign" if layout.scheme == "AutoAssign" else "FCOS"
    return (f"model = dict(\n    type='{detector}',"
            f"\n    backbone=dict(type='ResNet', depth={layout.depth}, num_stages=4, "
            f"out_indices=(0, 1, 2, 3), frozen_stages=1, {dcn}style='{layout.style}'),\n"
            f"    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, "
            f"start_level=1, {neck}, num_outs=5, relu_before_extra_convs=True),\n"
            f"    bbox_head=dict({head}, num_classes=80, in_channels=256, stacked_convs=4))\n")


def mmdet_checkpoint(model: OfficialDetector) -> dict:
    """The model saved as MMDetection 2.x's ``save_checkpoint`` does: ``meta`` (versions,
    config text, classes, epoch), ``state_dict`` and the SGD ``optimizer`` state."""
    state_dict = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    params = [p for p in model.parameters() if p.requires_grad]
    # Momentum buffers of the parameters' shapes, as stride-0 views of one number each, so that
    # the file stays small (the converter ignores the optimizer).
    optimizer = {
        "state": {i: {"momentum_buffer": torch.tensor(1e-3).expand(p.shape)}
                  for i, p in enumerate(params)},
        "param_groups": [{"lr": 0.0001, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0001,
                          "nesterov": False, "initial_lr": 0.01,
                          "params": list(range(len(params)))}],
    }
    meta = {"mmdet_version": "2.25.0", "mmcv_version": "1.7.0", "config": config_text(model.layout),
            "CLASSES": tuple(f"class_{i}" for i in range(COCO_CLASSES)), "epoch": 12,
            "iter": 87960, "exp_name": model.layout.exp_name, "time": "Mon Jan  1 00:00:00 2024"}
    return {"meta": meta, "state_dict": state_dict, "optimizer": optimizer}


def normalised_batch(images_bgr: List[Tensor], scheme: str) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """MMDetection's test pipeline on BGR images (3, H, W): ``Normalize`` (with ``to_rgb``) and
    ``Pad`` to a multiple of 32 (zeros), batched to the largest size; and the images' shapes.
    ``Normalize`` holds its mean and std in float32, as here."""
    mean, std, to_rgb = (torch.tensor(v, dtype=torch.float32) if isinstance(v, tuple) else v
                         for v in IMG_NORM[scheme])
    height = max(math.ceil(im.shape[1] / 32) * 32 for im in images_bgr)
    width = max(math.ceil(im.shape[2] / 32) * 32 for im in images_bgr)
    batch = images_bgr[0].new_zeros(len(images_bgr), 3, height, width)
    for i, image in enumerate(images_bgr):
        image = image.flip(0) if to_rgb else image
        normalised = (image - mean.to(image)[:, None, None]) / std.to(image)[:, None, None]
        batch[i, :, :image.shape[1], :image.shape[2]] = normalised
    return batch, [tuple(im.shape[1:]) for im in images_bgr]


# The official models: name -> (layout, the dw-d2 config that repeats it).
OFFICIAL_CASES = {
    "dw_r50_1x": (OfficialLayout("DW", 50, True, False, "dw_r50_fpn_1x_coco.py"),
                  "dw_R_50_FPN_1x.yaml"),
    "dw_r50_1x_norefine": (OfficialLayout("DW", 50, False, False,
                                          "dw_r50_fpn_worefine_1x_coco.py"),
                           "dw_R_50_FPN_1x_norefine.yaml"),
    "dw_r50_ms_2x": (OfficialLayout("DW", 50, True, False, "dw_r50_fpn_mstrain_2x_coco.py"),
                     "dw_R_50_FPN_ms_2x.yaml"),
    "dw_r50_dcn_ms_2x": (OfficialLayout("DW", 50, True, True,
                                        "dw_r50_fpn_dconv_c3-c5_mstrain_2x_coco.py"),
                         "dw_R_50_FPN_dcn_ms_2x.yaml"),
    "dw_r101_ms_2x_norefine": (OfficialLayout("DW", 101, False, False,
                                              "dw_r101_fpn_worefine_mstrain_2x_coco.py"),
                               "dw_R_101_FPN_ms_2x_norefine.yaml"),
    "autoassign_r50_1x": (OfficialLayout("AutoAssign", 50, False, False,
                                         "autoassign_r50_fpn_8x2_1x_coco.py"),
                          "autoassign_R_50_FPN_1x.yaml"),
}
