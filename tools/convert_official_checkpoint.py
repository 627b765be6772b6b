#!/usr/bin/env python
"""Convert an official DW or MMDetection AutoAssign checkpoint, or torchvision's ImageNet
ResNet weights, into a Detectron2 checkpoint of dw-d2.

    python tools/convert_official_checkpoint.py INPUT OUTPUT

INPUT is one of

* a checkpoint of an official DW model (strongwolf/DW: R-50 / R-101, with or without box
  refinement, with DCN) or of MMDetection 2.x's AutoAssign, as MMDetection saves it
  (``{"meta", "state_dict", "optimizer"}``) or as a bare state_dict. The model is recognised
  from its tensors (depth, refinement branch, deformable convs, the source of P6, the centre
  prior), cross-checked with the config text MMDetection stores in ``meta`` when present.
  Every tensor is renamed to dw-d2's layout; anything that has no place there stops the
  conversion with an error naming it. The tool prints the config to evaluate the result with;
* torchvision's ImageNet ResNet-50 / ResNet-101 weights (``resnet50-0676ba61.pth``,
  ``resnet101-63fe2227.pth``: IMAGENET1K_V1, what MMDetection's ``torchvision://resnet50``
  loads), converted into the start point of the official-recipe configs (the classifier is
  dropped).

The result is checked against a model built from that config: every tensor must have its
place and shape, and a detector checkpoint must leave nothing of the model uninitialised.
OUTPUT is written with ``torch.save`` (or as a Detectron2 ``.pkl`` when it ends with ``.pkl``).
"""
import argparse
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path("configs") / "COCO-Detection"

# ResNet blocks per stage (layer1-4 / res2-res5) -> depth.
_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


class OfficialModel(NamedTuple):
    """An official model: its config file and COCO val AP, and the dw-d2 config repeating it."""

    official_config: str
    official_ap: float
    config: str


# (scheme, depth, box refinement, DCN) -> the official model with that layout. Layouts that
# share weights and test settings but were trained differently (1x and multi-scale 2x) map to
# the first one listed; ``meta["exp_name"]`` picks the right one when the checkpoint has it.
OFFICIAL_MODELS: Dict[Tuple[str, int, bool, bool], List[OfficialModel]] = {
    ("DW", 50, True, False): [
        OfficialModel("dw_r50_fpn_1x_coco.py", 42.1, "dw_R_50_FPN_1x.yaml"),
        OfficialModel("dw_r50_fpn_mstrain_2x_coco.py", 44.8, "dw_R_50_FPN_ms_2x.yaml")],
    ("DW", 50, False, False): [
        OfficialModel("dw_r50_fpn_worefine_1x_coco.py", 41.5, "dw_R_50_FPN_1x_norefine.yaml")],
    ("DW", 50, True, True): [
        OfficialModel("dw_r50_fpn_dconv_c3-c5_mstrain_2x_coco.py", 47.9,
                      "dw_R_50_FPN_dcn_ms_2x.yaml")],
    ("DW", 101, False, False): [
        OfficialModel("dw_r101_fpn_worefine_mstrain_2x_coco.py", 46.1,
                      "dw_R_101_FPN_ms_2x_norefine.yaml")],
    ("AutoAssign", 50, False, False): [
        OfficialModel("autoassign_r50_fpn_8x2_1x_coco.py", 40.4, "autoassign_R_50_FPN_1x.yaml")],
}


class StartPoint(NamedTuple):
    """torchvision's ImageNet weights of one depth and the configs that start from them."""

    torchvision_file: str  # as https://download.pytorch.org/models/ publishes it
    path: str  # where the configs' MODEL.WEIGHTS expects the converted file
    configs: List[str]


TORCHVISION_START_POINTS = {
    50: StartPoint("resnet50-0676ba61.pth", "weights/torchvision-R-50.pth",
                   ["dw_R_50_FPN_1x.yaml", "dw_R_50_FPN_1x_norefine.yaml",
                    "dw_R_50_FPN_ms_2x.yaml", "dw_R_50_FPN_dcn_ms_2x.yaml"]),
    101: StartPoint("resnet101-63fe2227.pth", "weights/torchvision-R-101.pth",
                    ["dw_R_101_FPN_ms_2x_norefine.yaml"]),
}

# DW's centre prior is fixed (not learnt): mean 0, sigma 1 + 0.11 per class.
_DW_PRIOR_SIGMA = 1.11


class ConversionError(ValueError):
    """The input cannot be converted; the message says why and names the tensors."""


def _preview(names, limit=6):
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading the input
# --------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, allow_pickle: bool = False):
    """The object saved in ``path`` (tensors and plain containers only, unless
    ``allow_pickle``)."""
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        # torch.save's zip archive, or its older format (a pickle protocol 2 stream).
        is_torch_file = zipfile.is_zipfile(f) or (f.seek(0) == 0 and f.read(2) == b"\x80\x02")
    if not is_torch_file:
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive written "
                              f"by torch.save nor its older pickle format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ConversionError(
            f"{path}: holds objects other than tensors and plain containers ({first_line}). If "
            f"you trust the file, run again with --allow-pickle.") from None
    except Exception as e:  # a truncated or damaged file: say which
        raise ConversionError(f"{path}: torch.load cannot read it ({e})") from None


def split_checkpoint(checkpoint, path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of an MMDetection save (``{"meta", "state_dict", ...}``) or a bare
    state_dict; DistributedDataParallel's ``module.`` prefix removed."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    meta = {}
    if "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
        meta = checkpoint.get("meta") or {}
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        raise ConversionError(
            f"{path}: has a 'model' entry: it looks like a Detectron2 checkpoint already, which "
            f"train_net.py reads as it is (MODEL.WEIGHTS {path})")
    else:
        state_dict = checkpoint
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{path}: its state_dict has entries that are not tensors: "
                              f"{_preview(not_tensors)}")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict), dict(meta)


# --------------------------------------------------------------------------------------------
# ResNet: torchvision / MMDetection names -> Detectron2's
# --------------------------------------------------------------------------------------------
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RESNET_PATTERNS = [
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"bn1\.({'|'.join(_BN_TENSORS)})"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(rf"layer(\d)\.(\d+)\.bn(\d)\.({'|'.join(_BN_TENSORS)})"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.0\.weight"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(rf"layer(\d)\.(\d+)\.downsample\.1\.({'|'.join(_BN_TENSORS)})"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
    # mmcv's deformable conv keeps its offset conv inside (conv2.conv_offset); mmcv before
    # its version 2 of that module kept it beside (conv2_offset), as Detectron2 does.
    (re.compile(r"layer(\d)\.(\d+)\.conv2(?:\.conv_offset|_offset)\.(weight|bias)"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv2_offset.{m[3]}"),
]


def resnet_name(name: str) -> Optional[str]:
    """Detectron2's name (inside ``backbone.bottom_up``) of a torchvision-named ResNet tensor,
    or None if ``name`` is not one."""
    for pattern, rename in _RESNET_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return rename(match)
    return None


def resnet_layout(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Depth, deformable stages and their kind, from the tensors of a torchvision-named ResNet
    (under ``prefix``)."""
    blocks = [0, 0, 0, 0]
    deform_offsets = {}
    for name, tensor in state_dict.items():
        match = re.fullmatch(re.escape(prefix) + r"layer(\d)\.(\d+)\.conv1\.weight", name)
        if match:
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
        match = re.fullmatch(re.escape(prefix)
                             + r"layer(\d)\.(\d+)\.conv2(?:\.conv_offset|_offset)\.weight", name)
        if match:
            deform_offsets[(int(match[1]) - 1, int(match[2]))] = tensor.shape[0]
    depth = _DEPTHS.get(tuple(blocks))
    if depth is None:
        raise ConversionError(f"the ResNet has {blocks} blocks in its four stages, which is none "
                              f"of the depths {sorted(_DEPTHS.values())}")
    deform_stages = [any(stage == s for s, _ in deform_offsets) for stage in range(4)]
    for stage in range(4):
        covered = {b for s, b in deform_offsets if s == stage}
        if covered and covered != set(range(blocks[stage])):
            raise ConversionError(
                f"ResNet stage layer{stage + 1} has deformable convs in blocks {sorted(covered)} "
                f"only; Detectron2's DEFORM_ON_PER_STAGE makes whole stages deformable")
    channels = set(deform_offsets.values())
    if len(channels) > 1:
        raise ConversionError(f"the deformable convs' offset convs differ in size: {channels}")
    modulated, deform_groups = True, 1
    if channels:
        (offset_channels,) = channels
        if offset_channels % 27 == 0:
            deform_groups = offset_channels // 27  # DCNv2: 2 x 9 offsets + 9 mask channels
        elif offset_channels % 18 == 0:
            modulated, deform_groups = False, offset_channels // 18  # DCNv1
        else:
            raise ConversionError(f"offset convs with {offset_channels} outputs are neither "
                                  f"DCNv1 (18 per group) nor DCNv2 (27 per group)")
    return {"depth": depth, "deform_stages": deform_stages, "deform_modulated": modulated,
            "deform_groups": deform_groups}


# --------------------------------------------------------------------------------------------
# The MMDetection detectors (DW and AutoAssign)
# --------------------------------------------------------------------------------------------
class DetectorLayout(NamedTuple):
    scheme: str  # "DW" or "AutoAssign"
    depth: int
    box_refinement: bool
    deform_stages: List[bool]  # res2-res5
    deform_modulated: bool
    deform_groups: int
    head_dcn: bool
    num_classes: int
    num_convs: int
    p6_from_c5: bool

    @property
    def has_dcn(self) -> bool:
        return any(self.deform_stages) or self.head_dcn


def detector_layout(state_dict: Dict[str, torch.Tensor], meta: dict,
                    ignore_center_prior: bool = False) -> Tuple[DetectorLayout, List[str]]:
    """The layout of an MMDetection DW / AutoAssign detector, and notes for the user."""
    notes = []
    if "backbone.conv1.weight" not in state_dict:
        raise ConversionError("no backbone.conv1.weight: the backbone is not a ResNet with "
                              "MMDetection's (torchvision's) names")
    backbone = resnet_layout(state_dict, "backbone.")
    head_keys = [k for k in state_dict if k.startswith("bbox_head.")]
    if "bbox_head.conv_cls.weight" not in state_dict or "bbox_head.conv_reg.weight" not in \
            state_dict or "bbox_head.conv_centerness.weight" not in state_dict:
        raise ConversionError(
            "bbox_head has no conv_cls, conv_reg and conv_centerness: not the FCOS-style head of "
            f"DW or AutoAssign (its tensors: {_preview(head_keys)})")
    num_classes = state_dict["bbox_head.conv_cls.weight"].shape[0]
    num_convs = len({m[1] for k in head_keys
                     if (m := re.match(r"bbox_head\.cls_convs\.(\d+)\.", k))})
    dcn_convs = sorted({int(m[2]) for k in head_keys
                        if (m := re.match(r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.conv_offset\.",
                                          k))})
    if "bbox_head.cls_convs.0.gn.weight" not in state_dict:
        raise ConversionError("the head towers have no GroupNorm (bbox_head.cls_convs.0.gn); "
                              "the official heads and dw-d2's (MODEL.DW.NORM 'GN') have one")
    if dcn_convs and dcn_convs != [num_convs - 1]:
        raise ConversionError(f"the head towers have deformable convs at positions {dcn_convs}; "
                              f"dw-d2's head has them in the last conv ({num_convs - 1}) only")
    num_laterals = len({m[1] for k in state_dict
                        if (m := re.match(r"neck\.lateral_convs\.(\d+)\.", k))})
    if num_laterals != 3:
        raise ConversionError(f"the FPN has {num_laterals} lateral convs; DW's and AutoAssign's "
                              f"have 3 (C3-C5, start_level=1)")
    p6_key = "neck.fpn_convs.3.conv.weight"
    if p6_key not in state_dict or "neck.fpn_convs.4.conv.weight" not in state_dict:
        raise ConversionError("the FPN has no neck.fpn_convs.3 and .4 (the P6 and P7 convs)")
    p6_in = state_dict[p6_key].shape[1]
    c5_channels = state_dict.get("backbone.layer4.0.conv3.weight",
                                 state_dict.get("backbone.layer4.0.conv2.weight")).shape[0]
    if p6_in == c5_channels:
        scheme, p6_from_c5 = "AutoAssign", True
    elif p6_in == state_dict["neck.fpn_convs.2.conv.weight"].shape[0]:
        scheme, p6_from_c5 = "DW", False
    else:
        raise ConversionError(f"{p6_key} takes {p6_in} channels: neither C5's ({c5_channels}, "
                              f"AutoAssign) nor the FPN's (DW)")
    box_refinement = "bbox_head.reg_offset.weight" in state_dict
    if scheme == "AutoAssign" and (box_refinement or dcn_convs or any(backbone["deform_stages"])):
        raise ConversionError(
            "P6 is computed from C5 (MMDetection's AutoAssign) but the model also has "
            f"{'bbox_head.reg_offset (DW box refinement)' if box_refinement else 'DCN'}: no "
            f"official model has this layout")
    notes += _check_center_prior(state_dict, scheme, ignore_center_prior)
    notes += _check_meta_config(meta, scheme, box_refinement)
    layout = DetectorLayout(scheme, backbone["depth"], box_refinement, backbone["deform_stages"],
                            backbone["deform_modulated"], backbone["deform_groups"],
                            bool(dcn_convs), num_classes, num_convs, p6_from_c5)
    return layout, notes


def _check_center_prior(state_dict, scheme: str, ignore: bool) -> List[str]:
    mean = state_dict.get("bbox_head.center_prior.mean")
    sigma = state_dict.get("bbox_head.center_prior.sigma")
    if mean is None or sigma is None:
        raise ConversionError("bbox_head.center_prior.mean / .sigma are missing: DW and "
                              "AutoAssign heads both save their centre prior")
    if scheme == "AutoAssign":
        return [f"AutoAssign's learnt centre prior (mean in [{mean.min():.3f}, {mean.max():.3f}], "
                f"sigma in [{sigma.min():.3f}, {sigma.max():.3f}]) -> assigner.prior_mean / "
                f"prior_sigma"]
    expected = torch.full_like(sigma, _DW_PRIOR_SIGMA)
    if torch.equal(mean, torch.zeros_like(mean)) and torch.allclose(sigma, expected):
        return ["bbox_head.center_prior: DW's fixed prior (mean 0, sigma 1.11) as expected; "
                "dw-d2 keeps it as MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA, not as tensors"]
    uniform_sigma = float(sigma.flatten()[0])
    if torch.equal(mean, torch.zeros_like(mean)) and torch.equal(
            sigma, torch.full_like(sigma, uniform_sigma)):
        return [f"bbox_head.center_prior: mean 0 but sigma {uniform_sigma:g} everywhere (DW's is "
                f"1.11). Inference does not use it; to train from this checkpoint with its prior, "
                f"add MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA {uniform_sigma:g}"]
    message = (f"bbox_head.center_prior is not DW's fixed prior (mean 0, sigma 1.11): mean in "
               f"[{mean.min():.4f}, {mean.max():.4f}], sigma in [{sigma.min():.4f}, "
               f"{sigma.max():.4f}], per class. It was learnt, which DW's prior never is "
               f"(requires_grad=False), and dw-d2's DW keeps one sigma for all classes "
               f"(MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA).")
    if not ignore:
        raise ConversionError(message + " Inference does not use the prior: run again with "
                                        "--ignore-center-prior to convert the rest for evaluation.")
    return [message + " Dropped (--ignore-center-prior)."]


def _check_meta_config(meta: dict, scheme: str, box_refinement: bool) -> List[str]:
    """Cross-check the layout against the config text MMDetection saves in ``meta``."""
    text = meta.get("config")
    if not isinstance(text, str):
        return ["no config text in meta: the layout is read from the tensors alone"]
    notes = []
    head_type = re.search(r"type\s*=\s*['\"](DWHead|AutoAssignHead)['\"]", text)
    expected_head = {"DW": "DWHead", "AutoAssign": "AutoAssignHead"}[scheme]
    if head_type and head_type[1] != expected_head:
        raise ConversionError(
            f"meta's config says the head is {head_type[1]}, but the tensors have the layout of "
            f"{scheme} ({'P6 from C5' if scheme == 'AutoAssign' else 'P6 from P5'}); the "
            f"checkpoint and its config do not agree")
    style = re.search(r"style\s*=\s*['\"](pytorch|caffe)['\"]", text)
    expected_style = "caffe" if scheme == "AutoAssign" else "pytorch"
    if style and style[1] != expected_style:
        notes.append(
            f"WARNING: meta's config says style='{style[1]}', the official {scheme} models (and "
            f"the printed config) use '{expected_style}': evaluate with MODEL.RESNETS."
            f"STRIDE_IN_1X1 {style[1] == 'caffe'} and the input normalisation it was trained with")
    if re.search(r"reg_refine\s*=\s*False", text) and box_refinement:
        raise ConversionError("meta's config says reg_refine=False, but the checkpoint has "
                              "bbox_head.reg_offset (the refinement branch)")
    return notes


def _head_name(name: str, num_convs: int) -> Optional[str]:
    """dw-d2's name of a ``bbox_head.*`` tensor (the scales and centre prior aside)."""
    simple = {"conv_cls": "head.cls_score", "conv_reg": "head.distance_pred",
              "conv_centerness": "head.centerness_pred", "reg_offset": "head.refine_offset_pred"}
    match = re.fullmatch(r"bbox_head\.(conv_cls|conv_reg|conv_centerness|reg_offset)\."
                         r"(weight|bias)", name)
    if match:
        return f"{simple[match[1]]}.{match[2]}"
    # Each tower conv is (conv, GroupNorm, ReLU) in dw-d2's nn.Sequential tower.
    match = re.fullmatch(r"bbox_head\.(cls|reg)_convs\.(\d+)\.(conv(?:\.conv_offset)?|gn)\."
                         r"(weight|bias)", name)
    if match and int(match[2]) < num_convs:
        tower = {"cls": "head.cls_tower", "reg": "head.reg_tower"}[match[1]]
        index = 3 * int(match[2]) + (1 if match[3] == "gn" else 0)
        inside = ".conv_offset" if match[3] == "conv.conv_offset" else ""
        return f"{tower}.{index}{inside}.{match[4]}"
    return None


def _neck_name(name: str) -> Optional[str]:
    match = re.fullmatch(r"neck\.(lateral|fpn)_convs\.(\d)\.conv\.(weight|bias)", name)
    if not match:
        return None
    index = int(match[2])
    if match[1] == "lateral" and index < 3:
        return f"backbone.fpn_lateral{index + 3}.{match[3]}"
    if match[1] == "fpn" and index < 3:
        return f"backbone.fpn_output{index + 3}.{match[3]}"
    if match[1] == "fpn" and index in (3, 4):
        return f"backbone.top_block.p{index + 3}.{match[3]}"
    return None


def convert_detector(state_dict: Dict[str, torch.Tensor], layout: DetectorLayout
                     ) -> Dict[str, torch.Tensor]:
    """dw-d2's state_dict of an MMDetection DW / AutoAssign detector.

    Raises:
        ConversionError: naming every tensor that has no place in dw-d2's model.
    """
    converted = OrderedDict()
    unplaced = []
    scales = {}
    for name, tensor in state_dict.items():
        new_name = None
        if name.startswith("backbone."):
            inner = resnet_name(name[len("backbone."):])
            new_name = inner and f"backbone.bottom_up.{inner}"
        elif name.startswith("neck."):
            new_name = _neck_name(name)
        elif (match := re.fullmatch(r"bbox_head\.scales\.(\d+)\.scale", name)):
            scales[int(match[1])] = tensor
            continue
        elif name in ("bbox_head.center_prior.mean", "bbox_head.center_prior.sigma"):
            if layout.scheme == "AutoAssign":
                new_name = {"bbox_head.center_prior.mean": "assigner.prior_mean",
                            "bbox_head.center_prior.sigma": "assigner.prior_sigma"}[name]
            else:
                continue  # DW's fixed prior, checked by detector_layout
        elif name.startswith("bbox_head."):
            new_name = _head_name(name, layout.num_convs)
        if new_name is None:
            unplaced.append(name)
        else:
            converted[new_name] = tensor
    if unplaced:
        raise ConversionError(f"{len(unplaced)} tensors have no place in dw-d2's "
                              f"{layout.scheme} model: {_preview(unplaced, 12)}")
    if sorted(scales) != list(range(len(scales))) or not scales:
        raise ConversionError(f"bbox_head.scales.* should be numbered 0..L-1, got {sorted(scales)}")
    # mmcv keeps one 0-dim Scale per level; dw-d2's head one vector of the levels' scales.
    converted["head.scales"] = torch.stack([scales[level].reshape(()) for level in sorted(scales)])
    return converted


# --------------------------------------------------------------------------------------------
# Which config, and the check against the model it builds
# --------------------------------------------------------------------------------------------
def choose_config(layout: DetectorLayout, meta: dict) -> Tuple[Path, List[str], Optional[
        OfficialModel]]:
    """The dw-d2 config for ``layout``, the KEY VALUE options it needs on top, and the official
    model with that layout (None if it is none of them)."""
    key = (layout.scheme, layout.depth, layout.box_refinement, layout.has_dcn)
    candidates = OFFICIAL_MODELS.get(key, [])
    official = candidates[0] if candidates else None
    experiment = str(meta.get("exp_name", ""))
    for candidate in candidates:
        if experiment == candidate.official_config:
            official = candidate
    if official is not None:
        config = CONFIG_DIR / official.config
    elif layout.scheme == "AutoAssign":
        config = CONFIG_DIR / "autoassign_R_50_FPN_1x.yaml"
    else:
        config = CONFIG_DIR / ("dw_R_50_FPN_dcn_ms_2x.yaml" if layout.has_dcn
                               else "dw_R_50_FPN_1x.yaml")
    opts = []
    base = _config_values(config)
    wanted = {
        "MODEL.RESNETS.DEPTH": layout.depth,
        "MODEL.DW.BOX_REFINEMENT": layout.box_refinement,
        "MODEL.DW.NUM_CLASSES": layout.num_classes,
        "MODEL.DW.NUM_CONVS": layout.num_convs,
        "MODEL.DW.DCN_ON_LAST_CONV": layout.head_dcn,
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE": layout.deform_stages,
    }
    if any(layout.deform_stages):
        wanted["MODEL.RESNETS.DEFORM_MODULATED"] = layout.deform_modulated
        wanted["MODEL.RESNETS.DEFORM_NUM_GROUPS"] = layout.deform_groups
    for name, value in wanted.items():
        if _config_value(base, name) != value:
            opts += [name, _format_option(value)]
    return config, opts, official if not opts else None


def _format_option(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _config_values(config: Path, opts: Tuple[str, ...] = ()):
    from detectron2.config import get_cfg

    from dw_d2 import add_dw_config

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(REPO / config))
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
    return cfg


def _config_value(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def check_against_model(converted: Dict[str, torch.Tensor], config: Path, opts: List[str],
                        required_prefix: str = "") -> List[str]:
    """Build the model of ``config`` + ``opts`` and check ``converted`` against its state_dict:
    every tensor must exist there with the same shape, and every parameter and buffer of the
    model whose name starts with ``required_prefix`` must be in ``converted``.
    ``num_batches_tracked`` counters that the model's norm layers do not keep (Detectron2's
    FrozenBN) are dropped from ``converted``.

    Returns:
        notes for the user. Raises ConversionError on any mismatch.
    """
    from detectron2.modeling import build_model

    cfg = _config_values(config, tuple(opts) + ("MODEL.WEIGHTS", ""))
    model_state = build_model(cfg).state_dict()
    notes = []
    dropped = [k for k in converted if k.endswith(".num_batches_tracked") and k not in model_state]
    for key in dropped:
        del converted[key]
    if dropped:
        notes.append(f"dropped {len(dropped)} BatchNorm num_batches_tracked counters: the "
                     f"config's {cfg.MODEL.RESNETS.NORM} layers have none (unused at inference)")
    unexpected = [k for k in converted if k not in model_state]
    wrong_shape = [f"{k} {tuple(converted[k].shape)} (model: {tuple(model_state[k].shape)})"
                   for k in converted if k in model_state
                   and converted[k].shape != model_state[k].shape]
    missing = [k for k in model_state if k.startswith(required_prefix) and k not in converted]
    problems = []
    if unexpected:
        problems.append(f"not in the model: {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"of another shape: {_preview(wrong_shape)}")
    if missing:
        problems.append(f"missing from the conversion: {_preview(missing)}")
    if problems:
        raise ConversionError(f"the converted tensors do not fit {config} "
                              f"{' '.join(opts)}: " + "; ".join(problems))
    return notes


# --------------------------------------------------------------------------------------------
# torchvision ImageNet ResNets
# --------------------------------------------------------------------------------------------
def is_torchvision_resnet(state_dict) -> bool:
    return "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict


def convert_torchvision(state_dict: Dict[str, torch.Tensor]
                        ) -> Tuple[Dict[str, torch.Tensor], int, List[str]]:
    """Detectron2 names (``backbone.bottom_up.*``) of torchvision ResNet weights; the classifier
    (``fc``) is dropped."""
    layout = resnet_layout(state_dict)
    converted = OrderedDict()
    unplaced, dropped = [], []
    for name, tensor in state_dict.items():
        if name in ("fc.weight", "fc.bias"):
            dropped.append(name)
            continue
        new_name = resnet_name(name)
        if new_name is None:
            unplaced.append(name)
        else:
            converted[f"backbone.bottom_up.{new_name}"] = tensor
    if unplaced:
        raise ConversionError(f"{len(unplaced)} tensors are not part of a torchvision ResNet: "
                              f"{_preview(unplaced, 12)}")
    notes = [f"dropped the ImageNet classifier ({', '.join(dropped)})"] if dropped else []
    # torchvision's published files predate BatchNorm's batch counter: start it at 0 (BN with
    # frozen statistics never reads it), so that the start point covers the whole ResNet.
    counters = [k.replace("running_mean", "num_batches_tracked") for k in converted
                if k.endswith(".running_mean")]
    added = [k for k in counters if k not in converted]
    for key in added:
        converted[key] = torch.tensor(0, dtype=torch.long)
    if added:
        notes.append(f"added {len(added)} BatchNorm num_batches_tracked counters (0), which "
                     f"torchvision's file does not have")
    return converted, layout["depth"], notes


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def save(converted: Dict[str, torch.Tensor], path: Path, source: str) -> None:
    checkpoint = {"model": converted, "__author__": f"dw-d2 convert_official_checkpoint ({source})",
                  "matching_heuristics": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pkl":  # Detectron2 reads .pkl files as pickled numpy arrays
        checkpoint["model"] = {k: v.numpy() for k, v in converted.items()}
        with open(path, "wb") as f:
            pickle.dump(checkpoint, f)
    else:
        torch.save(checkpoint, path)


def _describe(layout: DetectorLayout) -> str:
    parts = [layout.scheme, f"ResNet-{layout.depth}",
             "box refinement" if layout.box_refinement else "no box refinement"]
    if any(layout.deform_stages):
        stages = [f"res{i + 2}" for i, on in enumerate(layout.deform_stages) if on]
        kind = "DCNv2" if layout.deform_modulated else "DCNv1"
        parts.append(f"{kind} in {'-'.join([stages[0], stages[-1]])}")
    if layout.head_dcn:
        parts.append("DCNv2 in the last conv of each head tower")
    parts.append("P6 from C5" if layout.p6_from_c5 else "P6 from P5")
    parts.append(f"{layout.num_classes} classes")
    return ", ".join(parts)


def _describe_source(meta: dict, checkpoint: dict) -> str:
    details = []
    for key in ("mmdet_version", "epoch", "iter", "exp_name"):
        if key in meta:
            details.append(f"{key} {meta[key]}")
    ignored = sorted(k for k in checkpoint if k not in ("meta", "state_dict"))
    if ignored:
        details.append(f"ignored: {', '.join(ignored)}")
    kind = "an MMDetection checkpoint" if "state_dict" in checkpoint else "a bare state_dict"
    return kind + (f" ({'; '.join(details)})" if details else "")


def convert(input_path: Path, output_path: Path, allow_pickle: bool = False,
            ignore_center_prior: bool = False, out=print) -> Path:
    """Convert ``input_path`` into ``output_path`` and report on ``out``; returns the config to
    use it with."""
    checkpoint = load_checkpoint(input_path, allow_pickle)
    state_dict, meta = split_checkpoint(checkpoint, input_path)
    if is_torchvision_resnet(state_dict):
        converted, depth, notes = convert_torchvision(state_dict)
        out(f"Read {input_path}: torchvision ImageNet ResNet-{depth} weights, {len(state_dict)} "
            f"tensors")
        if depth not in TORCHVISION_START_POINTS:
            raise ConversionError(f"no official-recipe config starts from a ResNet-{depth} "
                                  f"(only from ResNet-{sorted(TORCHVISION_START_POINTS)})")
        start = TORCHVISION_START_POINTS[depth]
        config = CONFIG_DIR / start.configs[0]
        notes += check_against_model(converted, config, [], required_prefix="backbone.bottom_up.")
        save(converted, output_path, f"torchvision ResNet-{depth}")
        for note in notes:
            out(f"  {note}")
        out(f"Wrote {output_path}: {len(converted)} tensors under Detectron2's names "
            f"(backbone.bottom_up.*), the start point of the official-recipe configs")
        weights = ("" if Path(start.path) == output_path
                   else f" MODEL.WEIGHTS {output_path}  # the configs read {start.path}")
        out("Train with:")
        for name in start.configs:
            out(f"  python train_net.py --config-file {CONFIG_DIR / name} --num-gpus 8{weights}")
        return config

    if not any(k.startswith("bbox_head.") for k in state_dict):
        raise ConversionError(
            f"{input_path}: neither an MMDetection DW/AutoAssign detector (no bbox_head.* "
            f"tensors) nor torchvision ResNet weights; its tensors: {_preview(state_dict)}")
    layout, notes = detector_layout(state_dict, meta, ignore_center_prior)
    out(f"Read {input_path}: {_describe_source(meta, checkpoint)}, {len(state_dict)} tensors")
    out(f"Recognised: {_describe(layout)}")
    converted = convert_detector(state_dict, layout)
    config, opts, official = choose_config(layout, meta)
    if official is not None:
        out(f"  the official model {official.official_config} (COCO val AP {official.official_ap})")
        key = (layout.scheme, layout.depth, layout.box_refinement, layout.has_dcn)
        if meta.get("exp_name") != official.official_config:
            for other in OFFICIAL_MODELS[key][1:]:
                out(f"  or {other.official_config} (COCO val AP {other.official_ap}): the same "
                    f"layout and test settings, another training recipe "
                    f"({CONFIG_DIR / other.config}); meta names no experiment to tell them apart")
    else:
        out("  not one of the official models' layouts: the config below is the closest, with "
            "the options it needs")
    notes += check_against_model(converted, config, opts)
    for note in notes:
        out(f"  {note}")
    save(converted, output_path, f"{layout.scheme} R-{layout.depth} from {input_path.name}")
    out(f"Wrote {output_path}: {len(converted)} tensors; every tensor of the model built from "
        f"{config} has its value")
    out("Evaluate it with:")
    out(f"  python train_net.py --config-file {config} --eval-only MODEL.WEIGHTS {output_path}"
        + (" " + " ".join(opts) if opts else ""))
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Official DW models: strongwolf/DW (MMDetection 2.x); AutoAssign: MMDetection 2.x.")
    parser.add_argument("input", type=Path, help="MMDetection checkpoint or torchvision weights")
    parser.add_argument("output", type=Path, help="the Detectron2 checkpoint to write")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load an input that holds Python objects besides tensors (only for "
                             "files you trust)")
    parser.add_argument("--ignore-center-prior", action="store_true",
                        help="drop a DW centre prior that is not the fixed official one (it is "
                             "used in training only)")
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.allow_pickle, args.ignore_center_prior)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
