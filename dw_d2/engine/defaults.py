"""Detectron2's ``default_setup``, plus a ``dw_d2`` logger."""
import detectron2.engine.defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger


def default_setup(cfg, args):
    """``detectron2.engine.default_setup(cfg, args)`` (loggers, environment and config logged,
    ``config.yaml`` in ``OUTPUT_DIR``, RNGs seeded from ``SEED``), plus a ``dw_d2`` logger
    that writes to the console and ``OUTPUT_DIR/log.txt`` like Detectron2's."""
    d2_defaults.default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dw_d2",
                 abbrev_name="dw_d2")
