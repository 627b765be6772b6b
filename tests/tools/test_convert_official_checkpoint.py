"""tools/convert_official_checkpoint.py: official checkpoints as users have them, torchvision's
ImageNet weights, and what it refuses."""
import subprocess
import sys

import pytest
import torch
import torchvision

from detectron2.modeling import build_model

from tests.helpers import REPO, make_cfg, recording_checkpointer
from tests.official_model import OFFICIAL_CASES
from tools import convert_official_checkpoint as tool

COCO = REPO / "configs" / "COCO-Detection"
# name -> (what the tool recognises, the official config and AP it names)
EXPECTED = {
    "dw_r50_1x": ("DW, ResNet-50, box refinement, P6 from P5, 80 classes",
                  "dw_r50_fpn_1x_coco.py (COCO val AP 42.1)"),
    "dw_r50_1x_norefine": ("DW, ResNet-50, no box refinement, P6 from P5, 80 classes",
                           "dw_r50_fpn_worefine_1x_coco.py (COCO val AP 41.5)"),
    "dw_r50_ms_2x": ("DW, ResNet-50, box refinement, P6 from P5, 80 classes",
                     "dw_r50_fpn_mstrain_2x_coco.py (COCO val AP 44.8)"),
    "dw_r50_dcn_ms_2x": ("DW, ResNet-50, box refinement, DCNv2 in res3-res5, DCNv2 in the last "
                         "conv of each head tower, P6 from P5, 80 classes",
                         "dw_r50_fpn_dconv_c3-c5_mstrain_2x_coco.py (COCO val AP 47.9)"),
    "dw_r101_ms_2x_norefine": ("DW, ResNet-101, no box refinement, P6 from P5, 80 classes",
                               "dw_r101_fpn_worefine_mstrain_2x_coco.py (COCO val AP 46.1)"),
    "autoassign_r50_1x": ("AutoAssign, ResNet-50, no box refinement, P6 from C5, 80 classes",
                          "autoassign_r50_fpn_8x2_1x_coco.py (COCO val AP 40.4)"),
}


def run_tool(*argv, capsys):
    code = tool.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_official_layout_is_recognised_and_named(name, official_checkpoints):
    case = official_checkpoints(name)
    recognised, official = EXPECTED[name]
    lines = case.printed.splitlines()
    assert f"Recognised: {recognised}" in lines
    assert f"  the official model {official}" in lines
    assert "ignored: optimizer" in lines[0] and "mmdet_version 2.25.0" in lines[0]
    assert lines[-1] == (f"  python train_net.py --config-file configs/COCO-Detection/"
                         f"{case.config} --eval-only MODEL.WEIGHTS {case.converted}")
    converted = torch.load(case.converted, weights_only=True)
    assert converted["matching_heuristics"] is False
    assert converted["model"]["head.scales"].shape == (5,)
    if case.layout.scheme == "AutoAssign":
        assert converted["model"]["assigner.prior_mean"].shape == (80, 2)
    else:
        assert not any(k.startswith("assigner.") for k in converted["model"])


def test_the_command_line_as_a_user_runs_it(official_checkpoints, tmp_path):
    case = official_checkpoints("dw_r50_1x")
    output = tmp_path / "dw_r50_1x.pth"
    result = subprocess.run(
        [sys.executable, "tools/convert_official_checkpoint.py", str(case.mmdet), str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].strip() == (
        f"python train_net.py --config-file configs/COCO-Detection/dw_R_50_FPN_1x.yaml "
        f"--eval-only MODEL.WEIGHTS {output}")
    assert torch.equal(torch.load(output, weights_only=True)["model"]["head.scales"],
                       torch.load(case.converted, weights_only=True)["model"]["head.scales"])


def _modified(case, tmp_path, change):
    checkpoint = torch.load(case.mmdet, weights_only=True)
    change(checkpoint)
    path = tmp_path / "modified.pth"
    torch.save(checkpoint, path)
    return path


def test_tensors_without_a_place_are_named(official_checkpoints, tmp_path, capsys):
    case = official_checkpoints("dw_r50_1x_norefine")

    def add(checkpoint):
        checkpoint["state_dict"]["bbox_head.conv_iou.weight"] = torch.zeros(1, 256, 3, 3)
        checkpoint["state_dict"]["neck.fpn_convs.5.conv.weight"] = torch.zeros(256, 256, 3, 3)

    code, out, err = run_tool(_modified(case, tmp_path, add), tmp_path / "out.pth",
                              capsys=capsys)
    assert code == 1
    assert "2 tensors have no place in dw-d2's DW model: bbox_head.conv_iou.weight, " \
           "neck.fpn_convs.5.conv.weight" in err
    assert not (tmp_path / "out.pth").exists()


def test_a_learnt_prior_on_a_dw_head_is_refused_unless_ignored(official_checkpoints, tmp_path,
                                                               capsys):
    case = official_checkpoints("dw_r50_1x_norefine")

    def learn(checkpoint):
        checkpoint["state_dict"]["bbox_head.center_prior.mean"][3] = 0.25

    modified = _modified(case, tmp_path, learn)
    code, _, err = run_tool(modified, tmp_path / "out.pth", capsys=capsys)
    assert code == 1
    assert "bbox_head.center_prior is not DW's fixed prior (mean 0, sigma 1.11): mean in " \
           "[0.0000, 0.2500]" in err and "--ignore-center-prior" in err
    code, out, _ = run_tool(modified, tmp_path / "out.pth", "--ignore-center-prior",
                            capsys=capsys)
    assert code == 0 and "Dropped (--ignore-center-prior)" in out

    def other_sigma(checkpoint):
        checkpoint["state_dict"]["bbox_head.center_prior.sigma"].fill_(1.5)

    code, out, _ = run_tool(_modified(case, tmp_path, other_sigma), tmp_path / "out.pth",
                            capsys=capsys)
    assert code == 0 and "add MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA 1.5" in out


def test_a_layout_no_official_model_has_gets_the_closest_config_and_options(
        official_checkpoints, tmp_path, capsys):
    case = official_checkpoints("dw_r50_dcn_ms_2x")

    def drop_refinement(checkpoint):
        for key in ("bbox_head.reg_offset.weight", "bbox_head.reg_offset.bias"):
            del checkpoint["state_dict"][key]
        checkpoint["meta"] = {}

    output = tmp_path / "out.pth"
    code, out, _ = run_tool(_modified(case, tmp_path, drop_refinement), output, capsys=capsys)
    assert code == 0
    assert "not one of the official models' layouts" in out
    assert out.splitlines()[-1] == (f"  python train_net.py --config-file configs/COCO-Detection/"
                                    f"dw_R_50_FPN_dcn_ms_2x.yaml --eval-only MODEL.WEIGHTS "
                                    f"{output} MODEL.DW.BOX_REFINEMENT False")


def test_a_bare_state_dict_of_a_layout_two_official_models_share(official_checkpoints, tmp_path,
                                                                 capsys):
    case = official_checkpoints("dw_r50_1x")
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(case.mmdet, weights_only=True)["state_dict"], bare)
    code, out, _ = run_tool(bare, tmp_path / "out.pth", capsys=capsys)
    assert code == 0
    assert "a bare state_dict" in out and "no config text in meta" in out
    assert ("  or dw_r50_fpn_mstrain_2x_coco.py (COCO val AP 44.8): the same layout and test "
            "settings, another training recipe (configs/COCO-Detection/dw_R_50_FPN_ms_2x.yaml)"
            in out)


def test_a_config_that_contradicts_the_tensors_is_refused(official_checkpoints, tmp_path,
                                                          capsys):
    case = official_checkpoints("dw_r50_1x_norefine")

    def wrong_head(checkpoint):
        checkpoint["meta"]["config"] = checkpoint["meta"]["config"].replace("DWHead",
                                                                            "AutoAssignHead")

    code, _, err = run_tool(_modified(case, tmp_path, wrong_head), tmp_path / "out.pth",
                            capsys=capsys)
    assert code == 1 and "meta's config says the head is AutoAssignHead" in err


def test_inputs_that_are_not_official_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    code, _, err = run_tool(text, tmp_path / "out.pth", capsys=capsys)
    assert code == 1 and f"{text}: not a PyTorch checkpoint" in err
    detectron2_checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": {"head.scales": torch.ones(5)}}, detectron2_checkpoint)
    code, _, err = run_tool(detectron2_checkpoint, tmp_path / "out.pth", capsys=capsys)
    assert code == 1 and "looks like a Detectron2 checkpoint already" in err
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.ones(2)}}, other)
    code, _, err = run_tool(other, tmp_path / "out.pth", capsys=capsys)
    assert code == 1 and "neither an MMDetection DW/AutoAssign detector" in err
    code, _, err = run_tool(tmp_path / "missing.pth", tmp_path / "out.pth", capsys=capsys)
    assert code == 1 and "no such file" in err


def test_torchvision_imagenet_weights_become_the_official_start_point(tmp_path, capsys):
    torch.manual_seed(0)
    weights = torchvision.models.resnet50().state_dict()
    # torchvision's published IMAGENET1K_V1 files have no num_batches_tracked counters.
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    source = tmp_path / tool.TORCHVISION_START_POINTS[50].torchvision_file
    torch.save(weights, source)
    output = tmp_path / "torchvision-R-50.pkl"  # Detectron2's pickle format (.pth elsewhere)
    code, out, err = run_tool(source, output, capsys=capsys)
    assert code == 0, err
    assert "torchvision ImageNet ResNet-50 weights" in out
    assert "dropped the ImageNet classifier (fc.weight, fc.bias)" in out
    for config in tool.TORCHVISION_START_POINTS[50].configs:
        assert f"--config-file configs/COCO-Detection/{config} --num-gpus 8 MODEL.WEIGHTS " \
               f"{output}" in out
    cfg = make_cfg(COCO / "dw_R_50_FPN_1x.yaml", tmp_path, "MODEL.DEVICE", "cpu")
    model = build_model(cfg)
    checkpointer = recording_checkpointer(model)
    checkpointer.load(str(output))
    incompatible = checkpointer.incompatible
    assert incompatible.unexpected_keys == [] and incompatible.incorrect_shapes == []
    assert not any(k.startswith("backbone.bottom_up.") for k in incompatible.missing_keys)
    torch.testing.assert_close(model.backbone.bottom_up.res5[2].conv3.norm.running_var,
                               weights["layer4.2.bn3.running_var"])


def test_the_configs_read_the_start_points_the_tool_writes(tmp_path):
    for depth, start in tool.TORCHVISION_START_POINTS.items():
        for config in start.configs:
            cfg = make_cfg(COCO / config, tmp_path)
            assert (cfg.MODEL.WEIGHTS, cfg.MODEL.RESNETS.DEPTH) == (start.path, depth)
    configs = {m.config for models in tool.OFFICIAL_MODELS.values() for m in models}
    assert configs == {config for _, config in OFFICIAL_CASES.values()}
