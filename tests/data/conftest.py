"""Fixtures of the data tests: image files with planted faults, and small COCO datasets of them."""
import io
import itertools
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
_names = itertools.count()


def _pixels(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(
        0, 255, (height, width, 3), dtype=np.uint8))


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def png(width, height, *, seed=0, orientation=None):
    """A PNG; with ``orientation``, an eXIf chunk before the pixel data (Pillow's placement)."""
    out = io.BytesIO()
    kwargs = {"exif": _exif(orientation)} if orientation else {}
    _pixels(width, height, seed).save(out, "PNG", **kwargs)
    return out.getvalue()


def png_with_late_exif(width, height, orientation):
    """A PNG whose eXIf chunk follows the pixel data (allowed by the format; Pillow reads it
    only when decoding)."""
    data = png(width, height)
    tiff = _exif(orientation)[len(b"Exif\x00\x00"):]
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(
        ">I", zlib.crc32(b"eXIf" + tiff) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def jpeg(width, height, *, seed=0, orientation=None):
    out = io.BytesIO()
    kwargs = {"exif": _exif(orientation)} if orientation else {}
    _pixels(width, height, seed).save(out, "JPEG", **kwargs)
    return out.getvalue()


@pytest.fixture
def encode():
    """Encoders of test images: ``encode.png(w, h)``, ``encode.jpeg(w, h, orientation=6)``,
    ``encode.png_with_late_exif(w, h, 6)``."""
    return SimpleNamespace(png=png, jpeg=jpeg, png_with_late_exif=png_with_late_exif)


@pytest.fixture
def register_coco(tmp_path):
    """``register(images, annotations, categories, image_root, first_annotation_id=1)`` writes
    a COCO JSON of these records, registers it with ``register_coco_instances`` under a new
    name, and returns the name; the catalogs forget it after the test.

    Annotations get defaults, set on the given dicts: id (counting from
    ``first_annotation_id``), image_id 1, category 1, not crowd, area 1.
    """
    registered = []

    def register(images, annotations, categories, image_root, first_annotation_id=1):
        for index, ann in enumerate(annotations):
            ann.setdefault("id", first_annotation_id + index)
            ann.setdefault("image_id", 1)
            ann.setdefault("category_id", 1)
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", 1.0)
        json_file = tmp_path / f"instances_{len(registered)}.json"
        json_file.write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
        name = f"dw_d2_data_test_{next(_names)}"
        register_coco_instances(name, {}, str(json_file), str(image_root))
        registered.append(name)
        return name

    yield register
    for name in registered:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def coco_images(tmp_path, register_coco):
    """``make(images, annotations=())`` writes image files and a COCO JSON, registers them
    with ``register_coco_instances`` and returns the dataset's name.

    ``images``: (file_name, width, height, content) tuples: the width/height go into the JSON,
    ``content`` (bytes) into the file (None: a valid PNG of that size; "absent": no file).
    Annotations get defaults (id from 100, image_id 1, category 1, not crowd, area).
    """
    image_dirs = itertools.count()

    def make(images, annotations=()):
        image_dir = tmp_path / f"images_{next(image_dirs)}"
        image_dir.mkdir()
        entries = []
        for image_id, (file_name, width, height, content) in enumerate(images, start=1):
            entries.append({"id": image_id, "file_name": file_name, "width": width,
                            "height": height})
            if content != "absent":
                (image_dir / file_name).write_bytes(
                    png(width, height) if content is None else content)
        return register_coco(entries, [dict(a) for a in annotations], CATEGORIES, image_dir,
                             first_annotation_id=100)

    return make
