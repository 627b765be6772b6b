"""train_net.py on several processes (gloo, CPU) against one process, end to end.

Every run is a real ``train_net.py`` process (through ``tests/engine/train_net_probe.py``, which
adds records of what each process saw) on the built-in dataset, with a config small enough for
a 2-core CPU: 64 px images, ResNet-18 with GroupNorm, 5 iterations of 4 images.

* GroupNorm, not the built-in configs' BatchNorm: a BatchNorm's statistics depend on the images
  of each process, so 2 processes of 2 images cannot equal 1 process of 4. (The FPN keeps its
  64 channels: at 64 px, P7 is 1 x 1, and GroupNorm(32) of 32 channels would hold one value
  per group, which PyTorch refuses at inference.)
* The images all pad to 64 x 64: the loss covers every point of the padded input, so
  processes whose images pad to other sizes than the whole batch's would see other points.

Why 2 processes of 2 images equal 1 process of 4 (the math the tolerances rest on): each
process's loss is its images' sums divided by normalisers that the losses average over the
processes (the number of GT boxes, the negative normaliser); DistributedDataParallel averages
the gradients. So the averaged gradient is (S_0 + S_1) / (2 * mean(n_0, n_1)) = S / n, the
one-process gradient, as long as n >= 2: as in the official code, each normaliser is clamped
at 1 after the mean, so for n < 2 the term is max(n, 1) / 2 times the one-process term
(``test_distributed.py`` checks that relation). Here the batches hold 11 or more GT boxes.
DW's negative normaliser, sum(1 - w-) over candidates with IoU >= 0.5, is 0 for a model that
has not learnt to place boxes yet (the built-in configs' first iterations), so these runs start
with boxes of the objects' size, which puts it at 4.6 to 9.6 (the batches of the first 5
iterations, on the untrained model; 0 or 1 with the default initial distances). AutoAssign's
centre loss is a mean over each process's images, and the average of the processes' means is
the batch's mean (equal shares). What differs is floating-point order only: float32 sums over
2 + 2 images instead of 4, and the gradient all-reduce. See ``UPDATE_RTOL`` for what that
allows.

The one-process runs use as many threads as each of the two processes gets (cores // 2), so
that only the split into processes differs: the thread count alone also changes how float32
sums are cut (one process with 1 thread against 2: DW's updates differ by 4e-5 of their norm,
as much as 2 processes against 1).

Each run starts a fresh interpreter (and the 2-process ones two more): 8 runs, 10 to 20 s each
on a shared 2-core machine, 2 1/2 minutes for the module.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "engine" / "train_net_probe.py"
CONFIGS = {"DW": REPO / "configs" / "Builtin" / "dw_R_18_FPN_shapes.yaml",
           "AutoAssign": REPO / "configs" / "Builtin" / "autoassign_R_18_FPN_shapes.yaml"}

MAX_ITER = 5
# Checkpoints after iterations 1 and 3; the LR drops at iteration 3. Initial distances of one
# stride (not four): boxes of the size of these small objects, so that some reach IoU 0.5 and
# DW's negative normaliser starts above the number of processes (see the module docstring).
TINY = ["MODEL.RESNETS.NORM", "GN", "MODEL.DW.NUM_CONVS", "1",
        "MODEL.DW.DISTANCE_BIAS_INIT", "1.0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.STEPS", "(3,)", "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TEST", "()", "SEED", "5"]
# Evaluation: every detection scoring above 0.001, so that a 5-iteration model has some.
EVALUATION = ["DATASETS.TEST", "('dw_shapes_val',)", "MODEL.DW.SCORE_THRESH_TEST", "0.001"]
# A run that takes longer has hung (a process waiting for another in a collective).
RUN_TIMEOUT_S = 300
# Each of 2 processes gets this many threads on this machine (dw_d2.engine.launch).
THREADS_PER_PROCESS = max(1, len(os.sched_getaffinity(0)) // 2)
# The killed run: checkpoint after iteration 1, killed before iteration 3 ran, so the resumed
# run redoes iteration 2, then crosses the LR step at 3.
KILL_BEFORE = 3

# Losses: float32 sums in another order (2 + 2 images, then the mean over processes); measured
# at most 8e-6 (DW's negative loss, a small sum of many terms), 4e-7 for AutoAssign's.
LOSS_RTOL = 1e-4
# Weights: what training changed, the update w_final - w_initial, is compared, not the weights,
# which are dominated by their random initial values. Per tensor, the updates must agree within
# UPDATE_RTOL of the update's norm plus UPDATE_ATOL (the absolute term is for parameters whose
# exact gradient is 0, such as a conv bias followed by GroupNorm, whose updates of 1e-15 to
# 1e-10 are rounding noise); over the whole network, within NETWORK_UPDATE_RTOL. Measured: at
# most 7e-5 of the norm per tensor and 4e-5 over the network (DW), 1e-5 and 4e-6 (AutoAssign),
# a twentieth of the bounds; the failure message shows the worst tensor. A wrong split of the
# batch or a sum instead of a mean of the gradients changes every update by 100 %; a
# normaliser that is not averaged over the processes changes the loss it divides by a factor 2.
UPDATE_RTOL = 1e-2
UPDATE_ATOL = 1e-6
NETWORK_UPDATE_RTOL = 1e-3
# Two runs of the same processes (resumed, or spread over two "machines"): the same
# computation, up to the order of the threads' float32 sums.
SAME_RUN_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Running train_net.py


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_train_net(output_dir, args, probe_dir, log_name="stdout.txt", env=None):
    """Start ``train_net_probe.py ARGS OUTPUT_DIR output_dir`` in its own process group."""
    output_dir.mkdir(parents=True, exist_ok=True)
    probe_dir.mkdir(parents=True, exist_ok=True)
    log = open(output_dir / log_name, "w")
    process = subprocess.Popen(
        [sys.executable, str(PROBE), *map(str, args), "OUTPUT_DIR", str(output_dir)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        env={**os.environ, "DW_D2_PROBE_DIR": str(probe_dir), **(env or {})})
    process.log_path = output_dir / log_name
    log.close()
    return process


def wait(process, expect_success=True):
    """Wait for a run; fail the test with its output's tail if it hangs or fails."""
    try:
        returncode = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its worker processes
        process.wait()
        pytest.fail(f"train_net.py ran longer than {RUN_TIMEOUT_S} s (hung?):\n"
                    + process.log_path.read_text()[-3000:])
    if expect_success and returncode != 0:
        pytest.fail(f"train_net.py failed ({returncode}):\n" + process.log_path.read_text()[-5000:])
    return returncode


class Run:
    """A finished run: its folder, its probe records and its final checkpoint."""

    def __init__(self, output_dir, probe_dir):
        self.output_dir = output_dir
        results = probe_dir / "results.json"
        self.results = json.loads(results.read_text()) if results.exists() else None
        self.processes, self.steps = {}, {}
        for path in sorted(probe_dir.glob("rank*.jsonl")):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                rank = int(path.stem[len("rank"):])
                if record["event"] == "process":
                    self.processes[rank] = record
                else:
                    self.steps.setdefault(rank, {})[record["iteration"]] = record

    def batch(self, iteration):
        """The images of an iteration, all processes' in rank order."""
        return sum((self.steps[rank][iteration]["inputs"] for rank in sorted(self.steps)), [])

    def losses(self, iteration):
        return self.steps[0][iteration]["losses"]

    def checkpoint(self, name="model_final.pth"):
        return torch.load(self.output_dir / name, map_location="cpu", weights_only=False)


def train(output_dir, assigner, *opts, flags=(), processes=1, probe_dir=None, env=None,
          expect_success=True):
    """``train_net.py --num-gpus PROCESSES FLAGS`` with the options TINY then ``opts``; one
    process gets the threads of each of two (see the module docstring)."""
    probe_dir = probe_dir or output_dir / "probe"
    if processes == 1:
        env = {"OMP_NUM_THREADS": str(THREADS_PER_PROCESS), **(env or {})}
    process = start_train_net(
        output_dir, ["--config-file", CONFIGS[assigner], "--num-gpus", processes,
                     "--dist-url", "auto", *flags, *TINY, *opts], probe_dir, env=env)
    returncode = wait(process, expect_success)
    run = Run(output_dir, probe_dir)
    run.returncode = returncode
    return run


class Runs:
    """The module's runs, each made once, on first use."""

    def __init__(self, root):
        self.root = root
        self.done = {}

    def get(self, name):
        if name not in self.done:
            try:
                self.done[name] = getattr(self, name)()
            except BaseException as error:
                self.done[name] = error
                raise
        if isinstance(self.done[name], BaseException):
            pytest.fail(f"the run {name} failed in an earlier test")
        return self.done[name]

    def dw_1(self):
        return train(self.root / "dw_1", "DW")

    def autoassign_1(self):
        return train(self.root / "autoassign_1", "AutoAssign")

    def dw_2(self):
        # It also evaluates on both processes when training ends.
        return train(self.root / "dw_2", "DW", *EVALUATION, processes=2)

    def autoassign_2(self):
        return train(self.root / "autoassign_2", "AutoAssign", processes=2)

    def dw_2_killed(self):
        out = self.root / "dw_2_resumed"
        run = train(out, "DW", processes=2, probe_dir=out / "probe_killed",
                    env={"DW_D2_PROBE_KILL_BEFORE": str(KILL_BEFORE)}, expect_success=False)
        run.checkpoints = sorted(p.name for p in out.glob("model_*.pth"))
        run.last_checkpoint = (out / "last_checkpoint").read_text().strip()
        return run

    def dw_2_resumed(self):
        self.get("dw_2_killed")
        out = self.root / "dw_2_resumed"
        return train(out, "DW", flags=["--resume"], processes=2,
                     probe_dir=out / "probe_resumed")

    def dw_2_machines(self):
        """Two launches of one process each, as two machines would start them."""
        out, probe_dir = self.root / "dw_2_machines", self.root / "dw_2_machines" / "probe"
        url = f"tcp://127.0.0.1:{_free_port()}"
        # Both "machines" share this one: each gets the threads of one of 2 processes.
        machines = [start_train_net(
            out, ["--config-file", CONFIGS["DW"], "--num-gpus", 1, "--num-machines", 2,
                  "--machine-rank", rank, "--dist-url", url, *TINY], probe_dir,
            log_name=f"stdout_machine{rank}.txt",
            env={"OMP_NUM_THREADS": str(THREADS_PER_PROCESS)}) for rank in (0, 1)]
        for machine in machines:
            wait(machine)
        return Run(out, probe_dir)

    def dw_eval_1(self):
        """``--eval-only`` on one process, of the 2-process run's final weights."""
        trained = self.get("dw_2")
        return train(self.root / "dw_eval_1", "DW", *EVALUATION,
                     "MODEL.WEIGHTS", trained.output_dir / "model_final.pth",
                     flags=["--eval-only"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("multiprocess"))


# ---------------------------------------------------------------------------------------------
# Comparisons


def initial_weights(assigner):
    """The weights the runs start from: Detectron2 seeds the main process with SEED before it
    builds the model, and DistributedDataParallel copies the main process's weights."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    from dw_d2 import add_dw_config

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(CONFIGS[assigner]))
    cfg.merge_from_list(TINY)
    seed_all_rng(cfg.SEED)
    return build_model(cfg).state_dict()


def assert_same_updates(initial, final, reference_final, what):
    """``final - initial`` against ``reference_final - initial`` (see UPDATE_RTOL)."""
    worst, network_difference, network_norm = (None, 0.0), 0.0, 0.0
    for name, start in initial.items():
        if not start.is_floating_point():
            continue
        update, reference = final[name] - start, reference_final[name] - start
        difference, norm = float((update - reference).norm()), float(reference.norm())
        network_difference += difference ** 2
        network_norm += norm ** 2
        excess = difference / (UPDATE_RTOL * norm + UPDATE_ATOL)
        if excess > worst[1]:
            worst = (f"{name} (update norm {norm:.1e}, difference {difference:.1e})", excess)
    assert network_norm > 0
    relative = (network_difference / network_norm) ** 0.5
    print(f"{what}: the updates differ by {relative:.1e} of their norm; worst tensor {worst[0]}")
    assert relative < NETWORK_UPDATE_RTOL, f"the updates differ by {relative:.2e} of their norm"
    assert worst[1] <= 1, f"worst tensor {worst[0]} (network: {relative:.2e})"


def assert_same_losses(run, reference, iterations, rtol, what):
    worst = 0.0
    for iteration in iterations:
        losses, expected = run.losses(iteration), reference.losses(iteration)
        assert set(losses) == set(expected) and "total_loss" in losses
        for name, value in expected.items():
            assert losses[name] == pytest.approx(value, rel=rtol, abs=0), \
                f"iteration {iteration} {name}: {losses[name]} vs {value}"
            worst = max(worst, abs(losses[name] - value) / abs(value))
    print(f"{what}: the losses differ by at most {worst:.1e} relative")


def assert_same_weights(run, reference, rtol):
    actual, expected = run.checkpoint()["model"], reference.checkpoint()["model"]
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def assert_processes(run, world_size, local_size):
    assert sorted(run.processes) == list(range(world_size))
    for rank, process in run.processes.items():
        assert process["world_size"] == world_size
        assert process["local_size"] == local_size
        assert process["local_rank"] == rank % local_size
        assert process["backend"] == ("gloo" if world_size > 1 else None)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.slow
@pytest.mark.parametrize("assigner", ["DW", "AutoAssign"])
def test_two_processes_train_like_one(runs, assigner):
    """2 processes of IMS_PER_BATCH 4 against 1 process of IMS_PER_BATCH 4."""
    name = {"DW": "dw", "AutoAssign": "autoassign"}[assigner]
    one, two = runs.get(f"{name}_1"), runs.get(f"{name}_2")
    assert_processes(one, 1, 1)
    assert_processes(two, 2, 2)
    # Each of the 2 processes gets half of the cores (on 2 cores: 1 thread each, not 2).
    assert {p["threads"] for p in two.processes.values()} == {THREADS_PER_PROCESS}

    # The same images, with the same augmentation, iteration by iteration: each process takes
    # its half of the one-process batch.
    for iteration in range(MAX_ITER):
        assert len(two.steps[0][iteration]["inputs"]) == 2
        assert two.batch(iteration) == one.batch(iteration), f"iteration {iteration}"
    what = f"{assigner}, 2 processes against 1"
    assert_same_losses(two, one, range(MAX_ITER), LOSS_RTOL, what)
    assert_same_updates(initial_weights(assigner), two.checkpoint()["model"],
                        one.checkpoint()["model"], what)


@pytest.mark.slow
def test_two_process_run_killed_between_checkpoints_and_resumed_ends_as_if_uninterrupted(runs):
    killed, resumed = runs.get("dw_2_killed"), runs.get("dw_2_resumed")
    uninterrupted = runs.get("dw_2")
    out = resumed.output_dir
    # Killed before iteration 3: iterations 0-2 ran, the last checkpoint is after iteration 1.
    assert killed.returncode != 0
    assert sorted(killed.steps[0]) == sorted(killed.steps[1]) == [0, 1, 2]
    assert killed.checkpoints == ["model_0000001.pth"]
    assert killed.last_checkpoint == "model_0000001.pth"
    log = (out / "log.txt").read_text()
    assert re.search(r"Loading from \S*model_0000001\.pth", log)
    assert "Starting training from iteration 2" in log

    assert_processes(resumed, 2, 2)
    assert sorted(resumed.steps[0]) == list(range(2, MAX_ITER))
    for iteration in range(MAX_ITER):
        run = killed if iteration < 2 else resumed
        assert run.batch(iteration) == uninterrupted.batch(iteration), f"iteration {iteration}"
    assert_same_losses(resumed, uninterrupted, range(2, MAX_ITER), SAME_RUN_RTOL,
                       "resumed against uninterrupted")
    assert_same_weights(resumed, uninterrupted, SAME_RUN_RTOL)
    momentum = resumed.checkpoint()["trainer"]["_trainer"]["optimizer"]["state"]
    expected = uninterrupted.checkpoint()["trainer"]["_trainer"]["optimizer"]["state"]
    assert len(momentum) == len(expected) > 0
    for key, state in expected.items():
        torch.testing.assert_close(momentum[key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=SAME_RUN_RTOL, atol=1e-7)


@pytest.mark.slow
def test_two_machines_of_one_process_train_like_one_machine_of_two(runs):
    machines, one_machine = runs.get("dw_2_machines"), runs.get("dw_2")
    # Global ranks 0 and 1, each alone on its "machine".
    assert_processes(machines, 2, 1)
    for iteration in range(MAX_ITER):
        assert machines.batch(iteration) == one_machine.batch(iteration)
    assert_same_losses(machines, one_machine, range(MAX_ITER), SAME_RUN_RTOL,
                       "2 machines against 1")
    assert_same_weights(machines, one_machine, SAME_RUN_RTOL)


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_one_process_results(runs):
    two, one = runs.get("dw_2"), runs.get("dw_eval_1")
    # Each process ran inference on its half of the 60 validation images.
    assert "Start inference on 30 batches" in (two.output_dir / "log.txt").read_text()
    assert "Start inference on 60 batches" in (one.output_dir / "log.txt").read_text()

    # The same detections, gathered from both processes in image order (each image's inference
    # is the same computation, with the same number of threads, in both runs).
    detections = [json.loads((run.output_dir / "inference" / "coco_instances_results.json")
                             .read_text()) for run in (two, one)]
    assert len(detections[1]) > 100
    assert detections[0] == detections[1]

    # COCOEvaluator's results, as Trainer.test returned them.
    assert set(two.results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert two.results["bbox"]["AP50"] > 0  # detections that the comparison can tell apart
    assert two.results == one.results
