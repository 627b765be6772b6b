#!/usr/bin/env python
"""Cost of the image-file check that runs before training, per 10,000 images.

Writes a valid COCO dataset of ``--images`` tiny images (half PNG, half JPEG, 16 to 48 px),
then times, as the median of ``--repeats`` runs:

1. reading the headers alone (``inspect_image_file`` on every file) in one process, with two
   threads, and with a pool of ``--workers`` processes: the measurement behind the choice of
   a process pool;
2. ``check_image_files`` as training runs it (stat, cache, headers, size comparison with the
   records): the first run, with an empty cache, and the second run, from the cache.

"cold" runs first evict the image files' contents from the page cache
(``posix_fadvise(DONTNEED)`` on each file: no privileges needed, nothing else evicted), as
after a reboot or on a dataset larger than memory; directory entries stay cached. "warm" runs
read files the previous run left in memory. The "headers read" column counts the files whose
header was opened (0 for a run answered by the cache).

Example (the README's figures; on a shared machine, run it under ``flock`` so that timed runs
do not overlap)::

    python tools/benchmark_image_check.py --images 10000 --repeats 3
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PER = 10_000  # the table's unit: seconds per this many images


def write_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` tiny images and their COCO JSON (one box each); returns the JSON's path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(16, 49, size=2))
        file_name = f"{i:06d}." + ("png" if i % 2 == 0 else "jpg")
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                            "bbox": [1, 1, width - 2, height - 2],
                            "area": (width - 2) * (height - 2)})
    json_file = folder / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "thing"}]}))
    return json_file


def evict(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class HeaderCounter:
    """Counts the files handed to the header reader (wraps its internal entry point)."""

    def __init__(self, module):
        self.module, self.count = module, 0
        self._original = module._read_in_parallel

    def __enter__(self):
        def counting(paths, *args, **kwargs):
            self.count += len(paths)
            return self._original(paths, *args, **kwargs)

        self.module._read_in_parallel = counting
        return self

    def __exit__(self, *exc):
        self.module._read_in_parallel = self._original


def time_runs(run, repeats, before=None):
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="images in the dataset")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes of the pool (default: the CPUs available)")
    parser.add_argument("--dir", default=None,
                        help="where to write the dataset, kept and reused by later runs "
                             "(default: a temporary folder, removed)")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from dw_d2.data import check_image_files, image_headers, load_dataset_dicts

    workers = args.workers or image_headers._available_cpus()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dw_d2_image_check_"))
    cache_root = Path(tempfile.mkdtemp(prefix="dw_d2_image_check_cache_"))
    name = "dw_d2_benchmark_image_check"
    rows = []
    try:
        json_file = root / "images" / "instances.json"
        if not json_file.is_file() or len(json.loads(json_file.read_text())["images"]) != \
                args.images:
            start = time.perf_counter()
            json_file = write_dataset(root / "images", args.images)
            print(f"Wrote {args.images} images in {time.perf_counter() - start:.1f} s to "
                  f"{root / 'images'}", flush=True)
        register_coco_instances(name, {}, str(json_file), str(root / "images"))
        dicts = load_dataset_dicts(name)
        paths = [d["file_name"] for d in dicts]

        def add(section, what, run, repeats=args.repeats, before=None):
            with HeaderCounter(image_headers) as counter:
                median, times = time_runs(run, repeats, before)
            read = len(paths) if section == "headers" else counter.count // repeats
            rows.append({"section": section, "run": what, "seconds": median,
                         "seconds_per_10k": median * PER / len(paths),
                         "headers_read_per_run": read, "runs": times})
            print(f"  {section}: {what}: {median:.3f} s", flush=True)

        def serial():
            results = [image_headers.inspect_image_file(p) for p in paths]
            assert all(r.ok for r in results)

        def threads():
            with ThreadPoolExecutor(2) as pool:
                assert all(r.ok for r in pool.map(image_headers.inspect_image_file, paths))

        def processes():
            results = image_headers._read_in_parallel(paths, workers, False, "")
            assert all(r.ok for r in results)

        for state, before in (("cold", lambda: evict(paths)), ("warm", None)):
            add("headers", f"1 process, {state}", serial, before=before)
            add("headers", f"2 threads, {state}", threads, before=before)
            add("headers", f"{workers} processes, {state}", processes, before=before)

        def fresh_cache():
            shutil.rmtree(cache_root, ignore_errors=True)
            cache_root.mkdir()

        previous_cache = os.environ.get("DW_D2_CACHE")
        os.environ["DW_D2_CACHE"] = str(cache_root)

        def check():
            check_image_files(dicts, name, progress=False)

        add("check_image_files", "first run (empty cache), cold", check,
            before=lambda: (fresh_cache(), evict(paths)))
        add("check_image_files", "first run (empty cache), warm", check,
            before=fresh_cache)
        check()  # fill the cache
        add("check_image_files", "second run (cache filled)", check)
    finally:
        if "previous_cache" in locals():
            if previous_cache is None:
                os.environ.pop("DW_D2_CACHE", None)
            else:
                os.environ["DW_D2_CACHE"] = previous_cache
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        shutil.rmtree(cache_root, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()
    print(f"\n{args.images} images (16-48 px, half PNG, half JPEG); {workers} CPUs available; "
          f"load average {load[0]:.2f}; Python {platform.python_version()}; median of "
          f"{args.repeats} runs\n")
    print("| what | run | headers read | time | per 10,000 images |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['section']} | {row['run']} | {row['headers_read_per_run']} | "
              f"{row['seconds']:.3f} s | {row['seconds_per_10k']:.3f} s |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"images": args.images, "workers": workers,
                                                 "load_average": load, "rows": rows},
                                                indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
