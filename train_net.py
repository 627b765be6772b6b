#!/usr/bin/env python
"""Train or evaluate dw-d2's detectors (or any Detectron2 box detector) with Detectron2.

The standard Detectron2 entry point::

    python train_net.py --config-file configs/Builtin/dw_R_18_FPN_shapes.yaml
    python train_net.py --config-file CONFIG --num-gpus 8 OUTPUT_DIR output/run1
    python train_net.py --config-file CONFIG --num-gpus 2 --dist-url auto  # CPU: gloo
    python train_net.py --config-file CONFIG --resume          # continue output/run1
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

``--resume`` continues from the last checkpoint in ``OUTPUT_DIR`` with the same data order
(see :mod:`dw_d2.engine.trainer`); with ``--eval-only`` it evaluates that checkpoint instead of
``MODEL.WEIGHTS`` when there is one.
"""
import logging

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from dw_d2 import add_dw_config
from dw_d2.engine import EvaluationCheckpointer, Trainer, default_setup, launch


def setup(args):
    """The config of this run: Detectron2's defaults, dw-d2's keys, the file, the options
    (``MODEL.DEVICE`` falls back to ``cpu`` when CUDA is not available)."""
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # The model-zoo configs say "cuda"; on a machine without one, run on the CPU, not fail.
    cuda_missing = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if cuda_missing:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    if cuda_missing:
        logging.getLogger("detectron2").warning("CUDA is not available: MODEL.DEVICE set to cpu.")
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        EvaluationCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
