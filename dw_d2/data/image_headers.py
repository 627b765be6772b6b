"""What Detectron2 will see of each image file, read from the file headers, in parallel, cached.

Detectron2's ``DatasetMapper`` reads an image with ``read_image`` (Pillow, then the EXIF
orientation applied by ``_apply_exif_orientation``) and compares its size with the record's
``width``/``height`` (``check_image_size``). A file that Pillow cannot read, or a size that
differs, fails there: in a data-loading worker, at the iteration that first draws the image.
:func:`read_image_infos` finds those files up front without decoding them.

How one file is inspected (:func:`inspect_image_file`):

* ``PIL.Image.open`` parses the header only: the format (from the content, not the file name:
  a PNG named ``.jpg`` is a PNG) and the size. A file that Pillow cannot identify (garbage
  bytes, an empty file, a file cut inside its header) is reported with Pillow's message.
* The size Detectron2 sees is the header's size, with width and height swapped when the EXIF
  orientation (5 to 8) transposes the image, read through the same ``Image.getexif()`` that
  Detectron2 calls; a JPEG's EXIF sits in its header.
* A file cut short after its header opens fine and fails only when decoded. Two cheap
  structural checks catch that for the common formats: a PNG's chunk chain must reach its
  ``IEND`` chunk (one 8-byte read per chunk, the data skipped); a JPEG must end with its
  end-of-image marker (a 2-byte read). A file that fails them is not condemned on that
  evidence (a JPEG may carry bytes after the marker, a PNG may lack only ``IEND`` and still
  decode): it is decoded with Detectron2's ``read_image``, whose verdict and size count.
  So is a PNG with metadata chunks after its pixel data, where Pillow finds EXIF only by
  decoding (``PngImageFile.getexif`` loads the image).
* What header reads cannot catch: corrupted bytes inside the compressed pixel data of a file
  of the right length, and truncation of formats without such a check (BMP, TIFF, WebP, GIF).
  Only decoding finds those, which costs as much as an epoch of data loading. (Detectron2
  itself often does not fail on corrupted data either: libjpeg decodes what it can, and for a
  PNG whose data Pillow cannot decode, ``read_image`` returns a black image, because the first
  decoding error happens inside its EXIF look-up, which ignores errors.)

The results are cached per file, keyed by the absolute path, size and modification time
(nanoseconds), so that checking the same dataset again reads no image. See
:class:`ImageInfoCache` for where the cache lives and why it is safe to share.
"""
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import struct
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import PIL
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

__all__ = ["ImageFileInfo", "ImageInfoCache", "cache_key", "default_cache_dir",
           "inspect_image_file", "read_image_infos"]

# EXIF orientations whose transform (transpose, rotation by 90 or 270 degrees, transverse)
# swaps width and height; 2-4 flip or rotate by 180 degrees and keep the size.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
# PNG chunks after the pixel data that Pillow reads into ``info`` only when decoding, and in
# which it looks for EXIF (eXIf, "Raw profile type exif" text, XMP's tiff:Orientation).
_PNG_METADATA_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")
_PNG_SIGNATURE_LENGTH = 8

# Below this many files to read, a process pool costs more than it saves (measured on 2
# cores, tools/benchmark_image_check.py: one process reads a header in 50 us when the file is
# in the page cache, 150 us when not; forking a pool from a process that has imported torch
# and Detectron2 costs about 0.1 s).
_MIN_FILES_FOR_POOL = 5000
_FILES_PER_TASK = 256
# Progress is shown when at least this many files must be read.
_MIN_FILES_FOR_PROGRESS = 2000
_PROGRESS_LOG_PERIOD_S = 10.0


@dataclass(frozen=True)
class ImageFileInfo:
    """One image file as Detectron2's ``read_image`` would return it.

    Attributes:
        problem: "" when the file is a readable image; "missing" (no such regular file),
            "unreadable" (it exists but cannot be opened, e.g. no permission) or "not_image"
            (Pillow cannot identify or decode it).
        detail: for a problem, the operating system's or Pillow's message.
        width, height: the size Detectron2 sees, after the EXIF orientation (0 on a problem).
        format: the format Pillow identified from the content (e.g. "PNG", "JPEG").
        orientation: the EXIF orientation Detectron2 applies (1 when none).
        decoded: the header was not conclusive and the file was decoded.
    """

    problem: str = ""
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    orientation: int = 1
    decoded: bool = False

    @property
    def ok(self) -> bool:
        return not self.problem


def inspect_image_file(path: str) -> ImageFileInfo:
    """Read one image file's header (see the module docstring); never raises for bad files."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        return ImageFileInfo(problem="missing", detail=e.strerror or str(e))
    except OSError as e:
        return ImageFileInfo(problem="unreadable", detail=e.strerror or str(e))
    with f:
        try:
            image = Image.open(f)
            width, height = image.size
            image_format = image.format or ""
            conclusive = _header_is_conclusive(image, f)
            orientation = _exif_orientation(image) if conclusive else 1
        except Exception as e:  # Pillow raises many types for unidentifiable files
            return ImageFileInfo(problem="not_image", detail=_pillow_message(e))
    if not conclusive:
        return _decode(path, image_format)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageFileInfo(width=width, height=height, format=image_format,
                         orientation=orientation)


def _header_is_conclusive(image, f) -> bool:
    """False when the file may be cut short, or when EXIF may follow the pixel data."""
    if image.format == "PNG":
        return _png_chunks_complete_without_late_metadata(f)
    if image.format in ("JPEG", "MPO"):
        f.seek(0, os.SEEK_END)
        if f.tell() < 2:
            return False
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"  # the end-of-image marker
    return True


def _png_chunks_complete_without_late_metadata(f) -> bool:
    f.seek(_PNG_SIGNATURE_LENGTH)
    seen_image_data = False
    while True:
        head = f.read(8)
        if len(head) < 8:
            return False  # the chain ends before IEND: cut short
        length, chunk_type = struct.unpack(">I4s", head)
        if chunk_type == b"IEND":
            return True
        if chunk_type == b"IDAT":
            seen_image_data = True
        elif seen_image_data and chunk_type in _PNG_METADATA_CHUNKS:
            return False
        f.seek(length + 4, os.SEEK_CUR)  # data and CRC


def _exif_orientation(image) -> int:
    # Detectron2 calls image.getexif() and treats any exception as "no EXIF". For a PNG that
    # method decodes the image to find chunks after the pixel data; the caller has checked
    # that there are none, so the base method reads the same metadata without decoding.
    getexif = Image.Image.getexif if image.format == "PNG" else type(image).getexif
    try:
        exif = getexif(image)
    except Exception:
        return 1
    orientation = exif.get(_EXIF_ORIENTATION_TAG) if exif is not None else None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _decode(path: str, image_format: str) -> ImageFileInfo:
    from detectron2.data.detection_utils import read_image  # the reader the mapper uses

    try:
        array = read_image(path)
    except Exception as e:
        return ImageFileInfo(problem="not_image", detail=_pillow_message(e),
                             format=image_format, decoded=True)
    return ImageFileInfo(width=int(array.shape[1]), height=int(array.shape[0]),
                         format=image_format, decoded=True)


def _pillow_message(error: Exception) -> str:
    # Pillow's messages name the file object (<_io.BufferedReader name=...>); callers name
    # the file themselves.
    message = re.sub(r"\s*<_io\.BufferedReader name=.*?>", "", str(error))
    return f"{type(error).__name__}: {message.strip() or 'no message'}"


def _inspect_files(paths: Sequence[str]) -> List[ImageFileInfo]:
    return [inspect_image_file(p) for p in paths]


# ----------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """``$DW_D2_CACHE``, else ``$XDG_CACHE_HOME/dw_d2``, else ``~/.cache/dw_d2``."""
    if os.environ.get("DW_D2_CACHE"):
        return Path(os.environ["DW_D2_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dw_d2"


# A file's cache entry: [size, mtime_ns, problem, detail, width, height, format, orientation,
# decoded]; missing and unreadable files are never cached (permissions change no mtime).
_ENTRY_TYPES = (int, int, str, str, int, int, str, int, bool)


class ImageInfoCache:
    """The :class:`ImageFileInfo` of a dataset's files, kept between runs.

    Where: one JSON file per dataset under ``<cache dir>/image_headers/`` (see
    :func:`default_cache_dir`), named after the dataset and a hash of its name and annotation
    file. It is outside ``OUTPUT_DIR`` on purpose: runs with different output folders (and
    the ``check_dataset`` command) share it. Entries are keyed by absolute path and hold the
    file's size and modification time: an entry whose file changed is ignored, so a stale or
    shared cache can cost time, never a wrong answer.

    Safe to share:

    * writes go to a temporary file in the same folder, renamed over the cache file
      (``os.replace`` is atomic), so a reader sees either the old or the new complete file;
    * writers hold an exclusive ``fcntl`` lock on ``<file>.lock`` while they read, merge and
      replace, so that processes checking parts of a dataset (distributed workers) or
      concurrent runs add to each other's entries instead of overwriting them;
    * a cache file that is unreadable, not JSON, or of another format or Pillow version is
      ignored with a warning, and replaced at the next write; a cache folder that cannot be
      written costs only the cache (a warning, then the check runs uncached).
    """

    FORMAT_VERSION = 1

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_dataset(cls, dataset_key: str, cache_dir: Optional[Path] = None) -> "ImageInfoCache":
        """The cache of the dataset identified by ``dataset_key`` (e.g. name + annotation file)."""
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_key.split("\0")[0])[:60]
        digest = hashlib.sha1(dataset_key.encode("utf-8")).hexdigest()[:16]
        return cls(cache_dir / "image_headers" / f"{readable}-{digest}.json")

    def _stamp(self) -> dict:
        # What could change a file's verdict without changing the file.
        return {"format": self.FORMAT_VERSION, "pillow": PIL.__version__,
                "load_truncated_images": bool(ImageFile.LOAD_TRUNCATED_IMAGES)}

    def load(self) -> Dict[str, list]:
        """Entries by absolute path ({} when there is no usable cache file)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                content = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning(f"Ignoring the image-check cache {self.path}: it cannot be read ({e}).")
            return {}
        if not isinstance(content, dict) or not isinstance(content.get("entries"), dict):
            logger.warning(f"Ignoring the image-check cache {self.path}: not a cache file.")
            return {}
        if content.get("stamp") != self._stamp():
            return {}  # another format or Pillow version: checked again and replaced
        return content["entries"]

    @staticmethod
    def lookup(entries: Dict[str, list], path: str, stat: os.stat_result
               ) -> Optional[ImageFileInfo]:
        entry = entries.get(path)
        if (not isinstance(entry, list) or len(entry) != len(_ENTRY_TYPES)
                or not all(type(v) is t for v, t in zip(entry, _ENTRY_TYPES))):
            return None
        if entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            return None
        return ImageFileInfo(*entry[2:])

    @staticmethod
    def entry(info: ImageFileInfo, stat: os.stat_result) -> list:
        return [stat.st_size, stat.st_mtime_ns, info.problem, info.detail, info.width,
                info.height, info.format, info.orientation, info.decoded]

    def update(self, new_entries: Dict[str, list], keep: Callable[[str], bool]) -> None:
        """Merge ``new_entries`` into the cache file; entries of other paths survive while
        ``keep(path)`` (files of the current dataset), so the file follows the dataset."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = {p: e for p, e in self.load().items() if keep(p)}
                entries.update(new_entries)
                fd, temporary = tempfile.mkstemp(dir=self.path.parent,
                                                 prefix=self.path.name + ".", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"stamp": self._stamp(), "entries": entries}, f,
                                  separators=(",", ":"))
                    os.replace(temporary, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
        except OSError as e:
            logger.warning(f"Could not write the image-check cache {self.path} ({e}); the next "
                           f"run checks these images again. Set DW_D2_CACHE to a writable "
                           f"folder to keep it.")

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # no advisory locks (Windows): atomic replace still keeps it valid
            yield
            return
        with open(str(self.path) + ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- many files


def read_image_infos(
    paths: Sequence[str],
    *,
    cache: Optional[ImageInfoCache] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    description: str = "image headers",
    dataset_paths: Optional[Sequence[str]] = None,
) -> List[ImageFileInfo]:
    """The :class:`ImageFileInfo` of each path, reading only the files the cache lacks.

    Args:
        paths: image files (relative paths are taken from the current folder).
        cache: where results are kept between runs; None reads every file.
        workers: processes reading headers; None picks the number of CPUs available when at
            least 5,000 files must be read, and reads in this process otherwise (header reads
            are CPU-bound Python: on two cores, two threads were slower than one, and two
            processes about 1.5 times faster on files not in the page cache, as fast on files
            in it).
        progress: show progress (a tqdm bar on a terminal, else a log line every 10 s) when at
            least 2,000 files must be read.
        description: what the progress bar says it reads.
        dataset_paths: all files of the dataset when ``paths`` is a share of them (a
            distributed worker's): the cache keeps the entries of these files, and drops the
            others' (default: ``paths``).

    Returns:
        list[ImageFileInfo], in the order of ``paths``.
    """
    absolute = [os.path.abspath(p) for p in paths]
    infos: List[Optional[ImageFileInfo]] = [None] * len(absolute)
    stats: Dict[int, os.stat_result] = {}
    entries = cache.load() if cache is not None else {}
    to_read = []
    for i, path in enumerate(absolute):
        try:
            stat = os.stat(path)
        except FileNotFoundError as e:
            infos[i] = ImageFileInfo(problem="missing", detail=e.strerror or str(e))
            continue
        except OSError as e:
            infos[i] = ImageFileInfo(problem="unreadable", detail=e.strerror or str(e))
            continue
        if not os.path.isfile(path):
            infos[i] = ImageFileInfo(problem="missing", detail="not a regular file")
            continue
        stats[i] = stat
        infos[i] = ImageInfoCache.lookup(entries, path, stat)
        if infos[i] is None:
            to_read.append(i)

    read = _read_in_parallel([absolute[i] for i in to_read], workers, progress, description)
    new_entries = {}
    for i, info in zip(to_read, read):
        infos[i] = info
        if info.problem in ("", "not_image"):
            new_entries[absolute[i]] = ImageInfoCache.entry(info, stats[i])
    if cache is not None and new_entries:
        kept = set(absolute if dataset_paths is None else map(os.path.abspath, dataset_paths))
        cache.update(new_entries, keep=kept.__contains__)
    return infos


def _read_in_parallel(paths: List[str], workers: Optional[int], progress: bool,
                      description: str) -> List[ImageFileInfo]:
    if not paths:
        return []
    if workers is None:
        workers = _available_cpus() if len(paths) >= _MIN_FILES_FOR_POOL else 1
    # A forked worker starts in milliseconds and inherits the imported modules; a spawned one
    # would import torch and Detectron2 again (seconds). Fork is what PyTorch's DataLoader
    # workers use on Linux too.
    fork = "fork" in multiprocessing.get_all_start_methods()
    chunks = [paths[i:i + _FILES_PER_TASK] for i in range(0, len(paths), _FILES_PER_TASK)]
    reporter = _Progress(len(paths), description,
                         enabled=progress and len(paths) >= _MIN_FILES_FOR_PROGRESS)
    results: List[List[ImageFileInfo]] = []
    with reporter:
        if workers <= 1 or not fork or len(chunks) == 1:
            for chunk in chunks:
                results.append(_inspect_files(chunk))
                reporter.advance(len(chunk))
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks)),
                                     mp_context=context) as pool:
                # map() keeps the order; results arrive chunk by chunk for the progress bar.
                for chunk, chunk_infos in zip(chunks, pool.map(_inspect_files, chunks)):
                    results.append(chunk_infos)
                    reporter.advance(len(chunk))
    return [info for chunk_infos in results for info in chunk_infos]


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


class _Progress:
    """A tqdm bar when stderr is a terminal; otherwise a log line at most every 10 s."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.total, self.description, self.enabled = total, description, enabled
        self.done = 0
        self._bar = None
        self._start = self._last_log = time.perf_counter()

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm  # a dependency of Detectron2

            self._bar = tqdm(total=self.total, desc=f"Checking {self.description}",
                             unit="file", file=sys.stderr, leave=False)
        elif self.enabled:
            logger.info(f"Checking {self.total} {self.description} ...")
        return self

    def advance(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and time.perf_counter() - self._last_log >= _PROGRESS_LOG_PERIOD_S:
            self._last_log = time.perf_counter()
            elapsed = self._last_log - self._start
            left = elapsed / self.done * (self.total - self.done)
            logger.info(f"Checked {self.done}/{self.total} {self.description} "
                        f"({elapsed:.0f} s, about {math.ceil(left)} s left).")

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        if self.enabled and exc[0] is None:
            logger.info(f"Checked {self.total} {self.description} in "
                        f"{time.perf_counter() - self._start:.1f} s.")
        return False


def cache_key(dataset_name: str, annotation_file: Optional[str]) -> str:
    """The key of a dataset's cache: its name and annotation file (when it has one)."""
    return dataset_name + "\0" + (os.path.abspath(annotation_file) if annotation_file else "")

