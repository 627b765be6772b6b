"""The official models, converted, predict in dw-d2 what they predict in their own code.

For each official layout (DW R-50 with and without box refinement, with DCN, R-101, and
MMDetection's AutoAssign), a model with the official structure and parameter names
(``tests/official_model.py``) gets random weights and is saved as MMDetection saves it; the
converter tool turns that file into a Detectron2 checkpoint, which loads through the dw-d2
config and Detectron2's checkpointer with no missing or unexpected keys. In float64, dw-d2's
per-level head outputs and final detections then equal the official code's to 1e-6 relative.

Conventions of Detectron2 that differ are checked for what they are, not tolerated away:
Detectron2's ``Boxes`` hold float32, so the detected boxes are the official ones rounded to
float32 (scores and classes stay exact); ``detector_postprocess`` drops boxes of zero width or
height after the top 100 (MMDetection keeps them): the test checks that it drops exactly those.
NMS runs in the model's precision on both sides (dw-d2 does not round to float32 first).
"""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess

from tests.helpers import REPO, make_cfg, recording_checkpointer
from tests.official_model import load_official, normalised_batch

RTOL = 1e-6
# Two images of different sizes in one batch: padding, and clipping to each image's size.
IMAGE_SIZES = [(64, 96), (50, 70)]
# The cases the tests cover; "dw_r50_ms_2x" has the layout of "dw_r50_1x" (the converter test
# covers its config choice).
EQUIVALENCE_CASES = ["dw_r50_1x", "dw_r50_1x_norefine", "dw_r50_dcn_ms_2x",
                     "dw_r101_ms_2x_norefine", "autoassign_r50_1x"]


def relative_difference(actual, expected):
    """max |actual - expected| / max |expected| (0 for two empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-300))


def assert_relatively_close(actual, expected, what):
    assert actual.shape == expected.shape, \
        f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=RTOL,
                               atol=RTOL * float(expected.abs().max()) if expected.numel() else 0,
                               msg=lambda m: f"{what}: {m}")
    return relative_difference(actual, expected)


def random_bgr_images(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=generator).double() for h, w in IMAGE_SIZES]


@pytest.mark.parametrize("name", EQUIVALENCE_CASES)
def test_converted_official_model_predicts_as_the_official_code(name, official_checkpoints,
                                                                tmp_path):
    case = official_checkpoints(name)
    layout, checkpoint = case.layout, case.converted
    config = REPO / "configs" / "COCO-Detection" / case.config
    official = load_official(case.mmdet, layout)
    assert case.printed.splitlines()[-1].strip() == (
        f"python train_net.py --config-file {config.relative_to(REPO)} --eval-only "
        f"MODEL.WEIGHTS {checkpoint}")

    cfg = make_cfg(config, tmp_path, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", checkpoint)
    model = build_model(cfg)
    checkpointer = recording_checkpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    incompatible = checkpointer.incompatible
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    model = model.double().eval()
    official = official.double().eval()

    # The same images through each side's input normalisation (MMDetection: BGR files, its
    # img_norm_cfg; dw-d2: the config's INPUT.FORMAT, PIXEL_MEAN and PIXEL_STD).
    images_bgr = random_bgr_images(seed=len(name))
    batched_inputs = [{"image": image.flip(0) if cfg.INPUT.FORMAT == "RGB" else image,
                       "height": image.shape[1], "width": image.shape[2]}
                      for image in images_bgr]
    official_batch, image_shapes = normalised_batch(images_bgr, layout.scheme)
    figures = {}
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        figures["input"] = assert_relatively_close(images.tensor, official_batch, "input")
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        official_outputs = official(official_batch)
    for level in range(len(features)):
        for ours, theirs, what in zip(predictions[:3], official_outputs,
                                      ("cls_logits", "box_dists", "ctr_logits")):
            key = f"{what} P{level + 3}"
            figures[key] = assert_relatively_close(ours[level], theirs[level], key)

    detections = model.forward_inference(images, features, predictions)
    official_detections = official.detect(official_outputs, image_shapes)
    for index, (ours, official_detection) in enumerate(zip(detections, official_detections)):
        boxes, scores, labels = official_detection
        assert len(ours) == len(boxes) > 20, f"image {index}: {len(ours)} != {len(boxes)}"
        assert torch.equal(ours.pred_classes, labels)
        figures[f"scores {index}"] = assert_relatively_close(ours.scores, scores, "scores")
        # Detectron2's Boxes hold float32: the boxes are the official ones rounded to float32.
        assert ours.pred_boxes.tensor.dtype == torch.float32
        figures[f"boxes {index}"] = assert_relatively_close(
            ours.pred_boxes.tensor.double(), boxes, "boxes")
        # detector_postprocess (scale 1 here) drops exactly the empty boxes.
        processed = detector_postprocess(ours, *image_shapes[index])
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        assert torch.equal(processed.pred_classes, labels[nonempty])
        assert_relatively_close(processed.pred_boxes.tensor.double(), boxes[nonempty], "boxes")
        print(f"image {index}: {len(ours)} detections, {int((~nonempty).sum())} of them empty")
    exact = {k: v for k, v in figures.items() if not k.startswith("boxes")}
    print(f"\n{name}: largest relative difference {max(exact.values()):.1e} "
          f"({max(exact, key=exact.get)}); boxes (float32 in Detectron2's Boxes) "
          f"{max(v for k, v in figures.items() if k.startswith('boxes')):.1e}")
