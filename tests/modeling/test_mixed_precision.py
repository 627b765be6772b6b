"""Mixed precision: the detector trains under autocast (bfloat16 on the CPU, AMP on CUDA)."""
import pytest
import torch

from tests.helpers import (BUILTIN_ASSIGNERS, BUILTIN_CONFIGS, TINY, image_input, run_train_net,
                           tiny_model)

BOXES = [(8.0, 10.0, 60.0, 50.0), (30.0, 20.0, 90.0, 70.0)]


@pytest.mark.parametrize("assigner", BUILTIN_ASSIGNERS)
def test_bfloat16_autocast_training_step_on_cpu(assigner):
    model = tiny_model("MODEL.ASSIGNER.NAME", assigner).train()
    batch = [image_input(96, 128, BOXES, (0, 1)), image_input(80, 112, seed=1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(value.dtype == torch.float32 for value in losses.values()), losses
    assert all(torch.isfinite(value) for value in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: AMP training is checked on the GPU machine")
@pytest.mark.parametrize("config_name", ["dw_R_18_FPN_shapes", "autoassign_R_18_FPN_shapes"])
def test_amp_training_on_cuda(tmp_path, config_name):
    out = tmp_path / "run"
    run_train_net("--config-file", BUILTIN_CONFIGS / f"{config_name}.yaml", *TINY,
                  "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", True, "SOLVER.MAX_ITER", 5,
                  "OUTPUT_DIR", out, "DATASETS.TEST", "()")
    assert (out / "model_final.pth").exists()
