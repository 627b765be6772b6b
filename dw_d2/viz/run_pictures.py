"""The pictures a finished training run leaves for its user: detections on a validation image
and the training curves."""
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils import comm
from detectron2.utils.visualizer import Visualizer

from .curves import load_metrics, plot_training_curves
from .detections import draw_detections, keep_confident
from .tool_config import dataset_class_names

__all__ = ["write_run_pictures", "DETECTIONS_PICTURE", "CURVES_PICTURE"]

logger = logging.getLogger(__name__)

DETECTIONS_PICTURE = "val_detections.png"
CURVES_PICTURE = "training_curves.png"
# Layout of the detections picture: ground truth | gap | detections, under a caption strip.
PANEL_GAP = 8
CAPTION_HEIGHT = 16


def _trained_weights(cfg):
    """The run's last checkpoint in ``cfg.OUTPUT_DIR``, else ``cfg.MODEL.WEIGHTS``."""
    checkpointer = DetectionCheckpointer(None, save_dir=cfg.OUTPUT_DIR)
    if checkpointer.has_checkpoint():
        return checkpointer.get_checkpoint_file()
    return cfg.MODEL.WEIGHTS


def _first_annotated(records):
    for record in records:
        if record.get("annotations"):
            return record
    return records[0]


def draw_validation_example(cfg, output_path, confidence_threshold=0.3, weights=None):
    """Ground truth beside the detections, on the first annotated image of ``DATASETS.TEST[0]``.

    Args:
        cfg (CfgNode): the run's config.
        output_path (str or Path): the PNG to write.
        confidence_threshold (float): detections scoring below it are not drawn.
        weights (str or None): checkpoint to load; default: the run's last checkpoint.

    Returns:
        Path: ``output_path``.
    """
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: no validation image to draw")
    dataset_name = cfg.DATASETS.TEST[0]
    dataset_class_names(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    record = _first_annotated(DatasetCatalog.get(dataset_name))

    predictor_cfg = cfg.clone()
    predictor_cfg.defrost()
    predictor_cfg.MODEL.WEIGHTS = weights or _trained_weights(cfg)
    predictor = DefaultPredictor(predictor_cfg)
    image_bgr = read_image(record["file_name"], format="BGR")
    instances = keep_confident(predictor(image_bgr)["instances"], confidence_threshold)

    image_rgb = image_bgr[:, :, ::-1]
    ground_truth = Visualizer(image_rgb, metadata).draw_dataset_dict(record).get_image()
    detections = draw_detections(image_rgb, instances, metadata)
    gap = np.full((image_rgb.shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    picture = Image.fromarray(np.concatenate([ground_truth, gap, detections], axis=1))
    framed = Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT), "white")
    framed.paste(picture, (0, CAPTION_HEIGHT))
    caption = ImageDraw.Draw(framed)
    caption.text((2, 3), f"ground truth ({Path(record['file_name']).name})", fill="black")
    caption.text((ground_truth.shape[1] + PANEL_GAP + 2, 3),
                 f"detections, score >= {confidence_threshold:.2f}", fill="black")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    framed.save(output_path)
    return output_path


def write_run_pictures(cfg, output_dir):
    """Draw one validation image's detections and the training curves of a run.

    Meant to be called after a run's final evaluation (by the main process; other workers
    get an empty list). A picture that cannot be drawn is logged and skipped, so that a
    finished training never fails on its pictures.

    Args:
        cfg (CfgNode): the run's config; the model is loaded from the last checkpoint in
            ``cfg.OUTPUT_DIR`` (else ``cfg.MODEL.WEIGHTS``), the curves from its
            ``metrics.json``.
        output_dir (str or Path): where ``val_detections.png`` and ``training_curves.png`` go.

    Returns:
        list[Path]: the pictures written.
    """
    if not comm.is_main_process():
        return []
    output_dir = Path(output_dir)
    written = []
    try:
        written.append(draw_validation_example(cfg, output_dir / DETECTIONS_PICTURE))
    except Exception as e:  # a picture must not turn a finished run into a failed one
        logger.warning(f"could not draw the validation detections: {e!r}")
    metrics_file = Path(cfg.OUTPUT_DIR) / "metrics.json"
    try:
        written.append(plot_training_curves(load_metrics(metrics_file),
                                            output_dir / CURVES_PICTURE,
                                            title=Path(cfg.OUTPUT_DIR).name))
    except Exception as e:
        logger.warning(f"could not plot the training curves from {metrics_file}: {e!r}")
    return written
