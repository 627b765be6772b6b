"""tools/inference_speed.py prints one images-per-second row per config."""
import pytest

from tests.helpers import REPO
from tools import inference_speed as tool_module


def test_inference_speed_table(capsys):
    tool = tool_module
    configs = [str(REPO / "configs" / "Builtin" / name)
               for name in ("dw_lite0_FPN_shapes.yaml", "dw_R_18_FPN_shapes.yaml")]
    assert tool.main([*configs, "--size", "64", "--images", "2", "--repeats", "1",
                      "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split(" | ")[0].strip(): line for line in lines if " | " in line}
    assert set(rows) == {"config", "dw_lite0_FPN_shapes.yaml", "dw_R_18_FPN_shapes.yaml"}
    for name in ("dw_lite0_FPN_shapes.yaml", "dw_R_18_FPN_shapes.yaml"):
        assert float(rows[name].split(" | ")[-1]) > 0
    assert "build_dw_timm_fpn_backbone" in rows["dw_lite0_FPN_shapes.yaml"]


def test_one_checkpoint_per_config_is_required():
    with pytest.raises(ValueError, match="one checkpoint per config"):
        tool_module.main(["a.yaml", "b.yaml", "--weights", "x.pth"])
