"""train_net.py with probes, for the multi-process tests (a script; pytest does not collect it).

    python tests/engine/train_net_probe.py [train_net.py's arguments]

runs train_net.py's own ``main`` through the same launcher and arguments, with a Trainer that
also writes, per process, ``$DW_D2_PROBE_DIR/rank<R>.jsonl``:

* one ``"process"`` line: rank, world size, local rank and size (``detectron2.utils.comm``),
  the torch.distributed backend and the threads of the process;
* one ``"step"`` line per iteration: the images this process's model received (file name and
  sum of the pixels after augmentation) and, on the main process, the losses Detectron2 logged
  for the iteration (averaged over the processes);

and, on the main process, ``results.json``: what ``Trainer.test`` returned (the COCO
evaluation results), after training or with ``--eval-only``.

With ``DW_D2_PROBE_KILL_BEFORE=K``, every process kills itself with SIGKILL just before
iteration K, as a preemption would, once all have finished iteration K - 1 (so that a
checkpoint written after iteration K - 1 is complete).
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils import comm

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import train_net  # noqa: E402  (train_net.py, the script under test)
from dw_d2.engine import launch  # noqa: E402

PROBE_DIR = "DW_D2_PROBE_DIR"
KILL_BEFORE = "DW_D2_PROBE_KILL_BEFORE"


class Probe(HookBase):
    """Writes the records described in the module docstring; kills the process if asked."""

    def __init__(self, probe_dir: Path, kill_before):
        self.kill_before = kill_before
        self.path = probe_dir / f"rank{comm.get_rank()}.jsonl"
        self.inputs = None

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def before_train(self):
        distributed = dist.is_available() and dist.is_initialized()
        self.write({
            "event": "process", "rank": comm.get_rank(), "world_size": comm.get_world_size(),
            "local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(),
            "backend": dist.get_backend() if distributed else None,
            "threads": torch.get_num_threads(),
        })
        self.trainer.model.register_forward_pre_hook(self.record_inputs)

    def record_inputs(self, module, args):
        self.inputs = [[d["file_name"], float(d["image"].double().sum())] for d in args[0]]

    def before_step(self):
        if self.trainer.iter == self.kill_before:
            comm.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self):
        losses = {}
        if comm.is_main_process():
            losses = {name: value for name, (value, iteration) in
                      self.trainer.storage.latest().items()
                      if iteration == self.trainer.iter
                      and (name == "total_loss" or name.startswith("loss_"))}
        self.write({"event": "step", "iteration": self.trainer.iter, "inputs": self.inputs,
                    "losses": losses})


class ProbedTrainer(train_net.Trainer):
    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            (Path(os.environ[PROBE_DIR]) / "results.json").write_text(json.dumps(results))
        return results

    def build_hooks(self):
        kill_before = os.environ.get(KILL_BEFORE)
        probe = Probe(Path(os.environ[PROBE_DIR]),
                      int(kill_before) if kill_before is not None else None)
        return super().build_hooks() + [probe]


# train_net.main builds the Trainer by this name.
train_net.Trainer = ProbedTrainer


def main(args):
    return train_net.main(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
