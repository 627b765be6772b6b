"""Detections of one image: drawn with Detectron2's Visualizer and written as JSON."""
import json
from pathlib import Path

from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

__all__ = [
    "keep_confident",
    "detections_to_records",
    "draw_detections",
    "write_detections_json",
    "save_prediction",
]


def keep_confident(instances, threshold):
    """The detections with ``scores >= threshold`` (an :class:`Instances` with ``scores``)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"confidence threshold must lie in [0, 1], got {threshold}")
    return instances[instances.scores >= threshold]


def detections_to_records(instances, class_names):
    """JSON-ready detections.

    Args:
        instances (Instances): with ``pred_boxes`` (Boxes, XYXY in image pixels), ``scores``
            and ``pred_classes``.
        class_names (list[str]): the dataset's ``thing_classes`` (contiguous ids).

    Returns:
        list[dict]: one dict per detection, by decreasing score, with ``bbox`` [x1, y1, x2, y2]
        (``bbox_mode`` "XYXY_ABS"), ``score``, ``category_id`` (contiguous) and ``category_name``.
    """
    instances = instances.to("cpu")
    order = instances.scores.argsort(descending=True)
    boxes = instances.pred_boxes.tensor[order].tolist()
    scores = instances.scores[order].tolist()
    classes = instances.pred_classes[order].tolist()
    records = []
    for box, score, cls in zip(boxes, scores, classes):
        if not 0 <= cls < len(class_names):
            raise ValueError(
                f"predicted class {cls} has no name: the metadata lists {len(class_names)} "
                f"classes {class_names}; does MODEL.DW.NUM_CLASSES match the dataset?"
            )
        records.append({
            "bbox": [round(v, 2) for v in box],
            "bbox_mode": "XYXY_ABS",
            "score": round(score, 5),
            "category_id": cls,
            "category_name": class_names[cls],
        })
    return records


def draw_detections(image_rgb, instances, metadata, scale=1.0):
    """The image with the detections drawn (boxes, class names, scores).

    Args:
        image_rgb (ndarray): (H, W, 3) uint8 RGB image in the detections' coordinates.
        instances (Instances): detections, as in :func:`detections_to_records`.
        metadata (Metadata): the dataset metadata (``thing_classes`` names the classes).
        scale (float): output size relative to the image.

    Returns:
        ndarray: (round(H * scale), round(W * scale), 3) uint8 RGB picture.
    """
    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances.to("cpu")).get_image()


def write_detections_json(path, image_file, image_size, records):
    """Write one image's detections as JSON.

    Args:
        path (str or Path): the JSON file to write.
        image_file (str): the image the detections belong to.
        image_size (tuple[int, int]): its (height, width).
        records (list[dict]): from :func:`detections_to_records`.

    Returns:
        Path: ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "file_name": str(image_file),
        "height": int(image_size[0]),
        "width": int(image_size[1]),
        "detections": records,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_prediction(predictor, image_file, output_dir, threshold, metadata):
    """Detect objects in one image file; write the drawn picture (PNG) and its detections (JSON).

    Args:
        predictor (DefaultPredictor): the model, with its test-time resizing.
        image_file (str or Path): the image to read.
        output_dir (str or Path): where ``<image stem>.png`` and ``<image stem>.json`` go.
        threshold (float): keep detections scoring at least this.
        metadata (Metadata): names the classes (``thing_classes``).

    Returns:
        tuple[Path, Path, int]: the PNG, the JSON, and the number of detections kept.
    """
    image_file = Path(image_file)
    try:
        image_bgr = read_image(str(image_file), format="BGR")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {image_file}: {e}") from e
    instances = keep_confident(predictor(image_bgr)["instances"], threshold)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    picture = draw_detections(image_bgr[:, :, ::-1], instances, metadata)
    png_path = output_dir / f"{image_file.stem}.png"
    Image.fromarray(picture).save(png_path)
    records = detections_to_records(instances, list(metadata.thing_classes))
    json_path = write_detections_json(
        output_dir / f"{image_file.stem}.json", image_file, image_bgr.shape[:2], records
    )
    return png_path, json_path, len(records)
