"""Distributed workers each read their share of the image files and all raise the same error."""
import json

from dw_d2.data import find_image_file_problems, load_dataset_dicts
from dw_d2.data import image_headers
from tests.helpers import run_on_gloo_workers


def _read_share(name):
    """This worker's image-file problems and the files it read itself."""
    read = []
    original = image_headers._read_in_parallel

    def counting(paths, *args, **kwargs):
        read.extend(paths)
        return original(paths, *args, **kwargs)

    image_headers._read_in_parallel = counting
    problems = find_image_file_problems(load_dataset_dicts(name), name)
    return [p.file_name for p in problems], read


def test_workers_share_the_reading_and_agree_on_the_problems(coco_images, encode, tmp_path):
    images = [(f"{i}.png", 20, 10, encode.png(20, 10)) for i in range(10)]
    images[3] = ("3.png", 20, 10, b"junk")
    images[6] = ("6.png", 20, 10, encode.png(21, 10))
    name = coco_images(images, [{"bbox": [1, 1, 5, 5]}])
    outputs = run_on_gloo_workers(lambda rank: _read_share(name), tmp_path / "init")
    (problems0, read0), (problems1, read1) = outputs[0], outputs[1]
    assert problems0 == problems1
    assert [p.rsplit("/", 1)[1] for p in problems0] == ["3.png", "6.png"]
    assert len(read0) == len(read1) == 5 and not set(read0) & set(read1)
    cache_files = list((image_headers.default_cache_dir() / "image_headers").glob(
        f"{name}-*.json"))
    assert len(json.loads(cache_files[0].read_text())["entries"]) == 10  # both shares merged
