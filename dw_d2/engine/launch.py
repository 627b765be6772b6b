"""Detectron2's ``launch``, which also runs several processes on a machine without CUDA.

``train_net.py --num-gpus N`` starts N training processes per machine through
:func:`launch`. On a machine with CUDA, and with any Detectron2 whose ``launch`` handles the
CPU itself (upstream since January 2023), it is Detectron2's ``launch``. Otherwise (the 2021
Detectron2 without CUDA, whose ``launch`` always asks for NCCL) it starts the processes the same
way on the gloo backend: same arguments, same ranks, the same ``detectron2.utils.comm`` state
(world group, the group of the processes on each machine), so ``comm.get_local_rank()`` and
``comm.synchronize()`` work as under Detectron2's launcher.

Several processes on the CPU share its cores: unless ``OMP_NUM_THREADS`` is set, each one
uses ``cores // processes per machine`` threads (at least one), as ``torchrun`` limits them.
PyTorch's default, all cores in every process, oversubscribes the machine: on a shared 2-core
machine, 2 processes of 2 threads each trained a small DW model at 5.8 s per iteration, 2
processes of 1 thread at 0.5 to 0.6 s.
"""
import functools
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

from ..compat import DETECTRON2_LAUNCH_SUPPORTS_CPU, create_local_process_group

__all__ = ["DEFAULT_TIMEOUT", "launch"]

logger = logging.getLogger(__name__)

# Detectron2's default: how long a collective waits for the other processes.
DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of
    ``num_machines`` machines (called on every machine), as Detectron2's ``launch``.

    Args:
        main_func: a picklable function (defined at a module's top level); processes are
            started with the "spawn" method.
        num_gpus_per_machine: processes on this machine: one per GPU, or any number on the CPU.
        num_machines: machines taking part.
        machine_rank: this machine's rank, 0 to ``num_machines - 1``.
        dist_url: where the processes meet, e.g. "tcp://10.0.0.1:29500" (the address of
            machine 0), or "auto" for a free local port (one machine only).
        args: the arguments of ``main_func``.
        timeout: how long a collective waits for the other processes.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1 or torch.cuda.is_available():
        return detectron2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                                 machine_rank=machine_rank, dist_url=dist_url, args=args,
                                 timeout=timeout)
    threads = cpu_threads_per_process(num_gpus_per_machine)
    if threads is not None:
        main_func = functools.partial(_with_cpu_threads, threads, main_func)
    if DETECTRON2_LAUNCH_SUPPORTS_CPU:
        return detectron2_launch(main_func, num_gpus_per_machine, num_machines=num_machines,
                                 machine_rank=machine_rank, dist_url=dist_url, args=args,
                                 timeout=timeout)
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine rank {machine_rank} is not in [0, {num_machines})")
    if dist_url is None:
        raise ValueError("dist_url is required for several processes (\"auto\" on one machine)")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError('dist_url "auto" works on one machine only; give the '
                             "tcp://host:port of machine 0")
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// is not a reliable init_method in multi-machine jobs. "
                       "Prefer tcp://")
    mp.start_processes(
        _gloo_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
        start_method="spawn",
    )


def cpu_threads_per_process(processes_per_machine: int):
    """Threads for each of the CPU processes on this machine: the usable cores shared out,
    at least one; None when ``OMP_NUM_THREADS`` is set (PyTorch then follows it)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes_per_machine)


def _with_cpu_threads(threads, main_func, *args):
    torch.set_num_threads(threads)
    return main_func(*args)


def _free_local_port() -> int:
    # Another process may take the port before the workers bind it; Detectron2 takes the
    # same chance.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _gloo_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url,
                 args, timeout):
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    create_local_process_group(num_per_machine)
    # As Detectron2's worker: a first collective before any work, so that a process that is
    # slow to start does not hit the timeout of the first real collective.
    comm.synchronize()
    main_func(*args)
