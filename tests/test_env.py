"""The environment dw-d2 runs on: Detectron2 importable, diagnostics printed, and the
2021 snapshot's missing compiled operators reported by name."""
import pytest

from dw_d2 import env


def test_detectron2_is_importable_with_the_parts_dw_d2_uses():
    import detectron2
    from detectron2.engine import DefaultTrainer  # noqa: F401
    from detectron2.evaluation import COCOEvaluator  # noqa: F401

    assert detectron2.__version__.startswith("0.")


def test_env_prints_one_row_per_component(capsys):
    env.main(["--short"])
    rows = [line.strip() for line in capsys.readouterr().out.splitlines()]
    for key in ("Python", "torch", "torchvision", "Detectron2", "Detectron2 compiled ops",
                "CUDA available", "dw_d2"):
        assert any(row.startswith(key + "  ") for row in rows), f"no {key!r} row in {rows}"
    assert "dw-d2 environment" not in rows  # --short drops the header


def test_env_header_without_short(capsys):
    env.main([])
    assert capsys.readouterr().out.startswith("dw-d2 environment\n")


def test_missing_compiled_operator_error_names_the_operator():
    if env.has_compiled_ops():
        pytest.skip("Detectron2's compiled operators are installed")
    from detectron2 import _C

    with pytest.raises(RuntimeError, match=r"detectron2\._C\.nms_rotated is a compiled"):
        _C.nms_rotated
    with pytest.raises(RuntimeError, match="deform_conv_forward"):
        _C.deform_conv_forward


def test_default_setup_works_on_this_detectron2(tmp_path):
    # Detectron2's environment table asks the compiled extension for its compiler version;
    # the snapshot's stand-in must answer that instead of raising.
    from argparse import Namespace

    from detectron2.config import get_cfg

    from dw_d2.engine import default_setup

    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    default_setup(cfg, Namespace(config_file="", eval_only=True))
    assert (tmp_path / "config.yaml").exists()
    assert "Environment info" in (tmp_path / "log.txt").read_text()
