"""Image files are judged from their headers as Detectron2's reader would judge them, without
decoding, and the verdicts are cached so that a second check reads no image."""
import io
import json
import os

import pytest
from detectron2.data.detection_utils import read_image
from PIL import Image, ImageFile

from dw_d2.data import image_headers
from dw_d2.data.image_headers import ImageInfoCache, inspect_image_file, read_image_infos


def _faults(encode):
    """name -> file content: valid files, and files Detectron2's reader fails on."""
    good_png, good_jpeg = encode.png(40, 30), encode.jpeg(40, 30)
    return {
        "png": good_png,
        "jpeg": good_jpeg,
        "jpeg_exif_rotated": encode.jpeg(40, 30, orientation=6),
        "jpeg_exif_flipped": encode.jpeg(40, 30, orientation=2),
        "png_early_exif_rotated": encode.png(40, 30, orientation=8),
        "png_late_exif_rotated": encode.png_with_late_exif(40, 30, 6),
        "jpeg_trailing_bytes": good_jpeg + b"\0" * 100,
        "png_without_iend_crc": good_png[:-1],
        "garbage": os.urandom(3000),
        "empty": b"",
        "png_cut_in_header": good_png[:20],
        "png_cut_in_pixel_data": good_png[: len(good_png) // 2],
        "jpeg_cut_in_pixel_data": good_jpeg[: len(good_jpeg) // 2],
        "jpeg_missing_last_byte": good_jpeg[:-1],
    }


def _detectron2_view(path):
    """What Detectron2's DatasetMapper gets: (width, height) or the error it raises."""
    try:
        image = read_image(path, format="BGR")
    except Exception as e:
        return type(e).__name__
    return image.shape[1], image.shape[0]


FAULT_NAMES = ["png", "jpeg", "jpeg_exif_rotated", "jpeg_exif_flipped",
               "png_early_exif_rotated", "png_late_exif_rotated", "jpeg_trailing_bytes",
               "png_without_iend_crc", "garbage", "empty", "png_cut_in_header",
               "png_cut_in_pixel_data", "jpeg_cut_in_pixel_data", "jpeg_missing_last_byte"]


@pytest.mark.parametrize("name", FAULT_NAMES)
def test_verdict_and_size_agree_with_detectron2s_reader(name, encode, tmp_path):
    path = tmp_path / f"{name}.jpg"  # every extension is .jpg: content decides
    path.write_bytes(_faults(encode)[name])
    info = inspect_image_file(str(path))
    expected = _detectron2_view(str(path))
    if isinstance(expected, str):
        assert info.problem == "not_image", (name, info)
        assert info.detail
    else:
        assert info.ok, (name, info)
        assert (info.width, info.height) == expected


def test_exif_orientation_that_transposes_swaps_the_size(encode, tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode.jpeg(40, 30, orientation=6))
    info = inspect_image_file(str(path))
    assert (info.width, info.height, info.orientation) == (30, 40, 6)
    assert not info.decoded


def test_png_named_jpg_is_a_png(encode, tmp_path):
    path = tmp_path / "actually_a_png.jpg"
    path.write_bytes(encode.png(40, 30))
    info = inspect_image_file(str(path))
    assert info.ok and info.format == "PNG" and (info.width, info.height) == (40, 30)


def test_sound_files_are_judged_without_decoding(encode, tmp_path, monkeypatch):
    contents = _faults(encode)
    paths = {}
    for name in ("png", "jpeg", "jpeg_exif_rotated", "png_early_exif_rotated", "garbage",
                 "empty", "png_cut_in_header"):
        paths[name] = tmp_path / name
        paths[name].write_bytes(contents[name])

    def no_decoding(self):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    infos = {name: inspect_image_file(str(p)) for name, p in paths.items()}
    assert all(not info.decoded for info in infos.values())
    assert [n for n, i in infos.items() if i.ok] == ["png", "jpeg", "jpeg_exif_rotated",
                                                   "png_early_exif_rotated"]


def test_what_a_header_read_cannot_see(encode, tmp_path):
    """A PNG of the right length whose compressed data is broken opens, ends with IEND and
    passes the check; Pillow fails only when decoding it (the documented limit), and
    Detectron2's reader returns a black image for it without an error."""
    data = bytearray(encode.png(64, 64))
    start = data.index(b"IDAT") + 4
    data[start:start + 2] = b"\xff\xff"  # an invalid zlib header
    path = tmp_path / "broken_data.png"
    path.write_bytes(bytes(data))
    assert inspect_image_file(str(path)).ok
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(path).load()
    assert read_image(str(path)).max() == 0


def test_missing_and_unreadable_files(tmp_path, encode):
    assert inspect_image_file(str(tmp_path / "nope.png")).problem == "missing"
    assert inspect_image_file(str(tmp_path)).problem == "unreadable"  # a folder
    locked = tmp_path / "locked.png"
    locked.write_bytes(encode.png(4, 4))
    locked.chmod(0)
    try:
        if not os.access(locked, os.R_OK):  # root reads any file
            info = inspect_image_file(str(locked))
            assert info.problem == "unreadable" and "Permission denied" in info.detail
    finally:
        locked.chmod(0o644)


# ----------------------------------------------------------------------------- many files


def _write_pngs(folder, count, encode):
    folder.mkdir(exist_ok=True)
    content = encode.png(12, 10)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        path.write_bytes(content)
        paths.append(str(path))
    return paths


@pytest.fixture
def count_opens(monkeypatch):
    """The number of images Pillow opened since the fixture was created."""
    opened = []
    original = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_second_run_reads_no_image_header(tmp_path, encode, count_opens):
    paths = _write_pngs(tmp_path / "images", 50, encode)
    cache = ImageInfoCache(tmp_path / "cache" / "dataset.json")
    first = read_image_infos(paths, cache=cache)
    assert len(count_opens) == 50
    second = read_image_infos(paths, cache=cache)
    assert len(count_opens) == 50  # nothing opened again
    assert second == first and all(info.ok for info in second)


def test_a_changed_file_is_read_again(tmp_path, encode, count_opens):
    paths = _write_pngs(tmp_path / "images", 5, encode)
    cache = ImageInfoCache(tmp_path / "cache.json")
    read_image_infos(paths, cache=cache)
    with open(paths[2], "wb") as f:
        f.write(b"not an image any more")
    infos = read_image_infos(paths, cache=cache)
    assert len(count_opens) == 6
    assert [i.problem for i in infos] == ["", "", "not_image", "", ""]
    # The verdict on the bad file is cached too.
    assert read_image_infos(paths, cache=cache)[2].problem == "not_image"
    assert len(count_opens) == 6


def test_missing_files_are_never_cached(tmp_path, encode):
    paths = _write_pngs(tmp_path / "images", 2, encode)
    cache = ImageInfoCache(tmp_path / "cache.json")
    os.unlink(paths[1])
    assert read_image_infos(paths, cache=cache)[1].problem == "missing"
    Image.open(paths[0]).save(paths[1])  # the file appears
    assert read_image_infos(paths, cache=cache)[1].ok


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"entries": 3}',
                                     b"\xff\xfe\x00garbage"])
def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path, encode, content, caplog):
    paths = _write_pngs(tmp_path / "images", 3, encode)
    cache_file = tmp_path / "cache.json"
    cache_file.write_bytes(content)
    infos = read_image_infos(paths, cache=ImageInfoCache(cache_file))
    assert all(info.ok for info in infos)
    assert "Ignoring the image-check cache" in caplog.text
    assert set(json.loads(cache_file.read_text())["entries"]) == set(paths)


def test_malformed_entries_are_misses(tmp_path, encode, count_opens):
    paths = _write_pngs(tmp_path / "images", 2, encode)
    cache = ImageInfoCache(tmp_path / "cache.json")
    read_image_infos(paths, cache=cache)
    content = json.loads(cache.path.read_text())
    content["entries"][paths[0]] = ["garbage"]
    content["entries"][paths[1]][4] = "wide"  # width of the wrong type
    cache.path.write_text(json.dumps(content))
    assert all(info.ok for info in read_image_infos(paths, cache=cache))
    assert len(count_opens) == 4


def test_another_pillow_version_invalidates_the_cache(tmp_path, encode, count_opens,
                                                      monkeypatch):
    paths = _write_pngs(tmp_path / "images", 2, encode)
    cache = ImageInfoCache(tmp_path / "cache.json")
    read_image_infos(paths, cache=cache)
    monkeypatch.setattr(image_headers.PIL, "__version__", "0.0.1")
    read_image_infos(paths, cache=cache)
    assert len(count_opens) == 4


def test_writers_merge_instead_of_overwriting(tmp_path, encode):
    """Two processes checking halves of a dataset (distributed workers, or two runs) both
    leave their entries; entries of files no longer in the dataset are dropped."""
    paths = _write_pngs(tmp_path / "images", 6, encode)
    cache_file = tmp_path / "cache.json"
    read_image_infos(paths[:3], cache=ImageInfoCache(cache_file))
    first_half = set(json.loads(cache_file.read_text())["entries"])
    # A second writer that knows the whole dataset but checks only the other half.
    infos = read_image_infos(paths[3:], cache=None)
    stats = {p: os.stat(p) for p in paths[3:]}
    ImageInfoCache(cache_file).update(
        {p: ImageInfoCache.entry(i, stats[p]) for p, i in zip(paths[3:], infos)},
        keep=set(paths).__contains__)
    assert set(json.loads(cache_file.read_text())["entries"]) == first_half | set(paths[3:])
    ImageInfoCache(cache_file).update({}, keep=set(paths[:2]).__contains__)
    assert set(json.loads(cache_file.read_text())["entries"]) == set(paths[:2])


def test_an_unwritable_cache_folder_costs_only_the_cache(tmp_path, encode, caplog):
    paths = _write_pngs(tmp_path / "images", 2, encode)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    infos = read_image_infos(paths, cache=ImageInfoCache(blocker / "sub" / "cache.json"))
    assert all(info.ok for info in infos)
    assert "Could not write the image-check cache" in caplog.text


def test_default_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DW_D2_CACHE", str(tmp_path / "mine"))
    assert image_headers.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DW_D2_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_headers.default_cache_dir() == tmp_path / "xdg" / "dw_d2"
    cache = ImageInfoCache.for_dataset(image_headers.cache_key("my/data set", "/a/b.json"))
    assert cache.path.parent == tmp_path / "xdg" / "dw_d2" / "image_headers"
    assert cache.path.name.startswith("my_data_set-")
    other = ImageInfoCache.for_dataset(image_headers.cache_key("my/data set", "/a/c.json"))
    assert other.path != cache.path


def test_process_pool_gives_the_serial_results(tmp_path, encode, monkeypatch):
    monkeypatch.setattr(image_headers, "_FILES_PER_TASK", 16)
    paths = _write_pngs(tmp_path / "images", 100, encode)
    with open(paths[37], "wb") as f:
        f.write(b"garbage")
    os.unlink(paths[58])
    serial = read_image_infos(paths, workers=1)
    parallel = read_image_infos(paths, workers=2)
    assert parallel == serial
    assert [i for i, info in enumerate(parallel) if not info.ok] == [37, 58]


def test_progress_is_logged_on_large_datasets(tmp_path, encode, monkeypatch, caplog):
    monkeypatch.setattr(image_headers, "_MIN_FILES_FOR_PROGRESS", 10)
    monkeypatch.setattr(image_headers, "_PROGRESS_LOG_PERIOD_S", 0.0)
    monkeypatch.setattr(image_headers, "_FILES_PER_TASK", 8)
    paths = _write_pngs(tmp_path / "images", 20, encode)
    with caplog.at_level("INFO", logger="dw_d2.data.image_headers"):
        read_image_infos(paths, description="test images")
    assert "Checking 20 test images" in caplog.text
    assert "Checked 8/20 test images" in caplog.text
    assert "Checked 20 test images in" in caplog.text


def test_progress_is_a_bar_on_a_terminal(tmp_path, encode, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(image_headers, "_MIN_FILES_FOR_PROGRESS", 10)
    terminal = Terminal()
    monkeypatch.setattr(image_headers.sys, "stderr", terminal)
    read_image_infos(_write_pngs(tmp_path / "images", 20, encode), description="test images")
    assert "Checking test images:   0%|" in terminal.getvalue()
    assert "/20 [" in terminal.getvalue() and "file/s]" in terminal.getvalue()
