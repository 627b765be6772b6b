"""Distributed workers each read their share of the image files and all raise the same error."""
import json
import multiprocessing as mp
import pickle
import queue
import traceback
from datetime import timedelta

import pytest
import torch.distributed as dist

from dw_d2.data import find_image_file_problems, load_dataset_dicts
from dw_d2.data import image_headers

WORLD_SIZE = 2
TIMEOUT_S = 60


def _worker(rank, init_file, name, results):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=TIMEOUT_S))
        read = []
        original = image_headers._read_in_parallel

        def counting(paths, *args, **kwargs):
            read.extend(paths)
            return original(paths, *args, **kwargs)

        image_headers._read_in_parallel = counting
        problems = find_image_file_problems(load_dataset_dicts(name), name)
        results.put((rank, pickle.dumps(([p.file_name for p in problems], read)), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_workers_share_the_reading_and_agree_on_the_problems(coco_images, encode, tmp_path):
    images = [(f"{i}.png", 20, 10, encode.png(20, 10)) for i in range(10)]
    images[3] = ("3.png", 20, 10, b"junk")
    images[6] = ("6.png", 20, 10, encode.png(21, 10))
    name = coco_images(images, [{"bbox": [1, 1, 5, 5]}])
    context = mp.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_worker, daemon=True,
                               args=(rank, tmp_path / "init", name, results))
               for rank in range(WORLD_SIZE)]
    for worker in workers:
        worker.start()
    outputs = {}
    try:
        while len(outputs) < WORLD_SIZE:
            try:
                rank, output, error = results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"workers gave no result (exit codes {[w.exitcode for w in workers]})")
            if error:
                pytest.fail(f"worker {rank} failed:\n{error}")
            outputs[rank] = pickle.loads(output)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    (problems0, read0), (problems1, read1) = outputs[0], outputs[1]
    assert problems0 == problems1
    assert [p.rsplit("/", 1)[1] for p in problems0] == ["3.png", "6.png"]
    assert len(read0) == len(read1) == 5 and not set(read0) & set(read1)
    cache_files = list((image_headers.default_cache_dir() / "image_headers").glob(
        f"{name}-*.json"))
    assert len(json.loads(cache_files[0].read_text())["entries"]) == 10  # both shares merged
