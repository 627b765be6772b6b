"""Shared test fixtures: where the golden reference cases live, and their per-kind lists."""
import json

import pytest
import torch

from tests.helpers import GOLDEN_DIR


@pytest.fixture(autouse=True, scope="session")
def _private_image_check_cache(tmp_path_factory):
    """Image-check results are cached under ``$DW_D2_CACHE`` (default ``~/.cache/dw_d2``): the
    tests keep theirs in a temporary folder (subprocesses inherit the variable)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DW_D2_CACHE", str(tmp_path_factory.mktemp("dw_d2_cache")))
    yield
    patch.undo()


def golden_case_files(kind):
    """File names of the golden cases of one kind (``dw_loss``, ...) as listed in index.json."""
    if not GOLDEN_DIR.is_dir():
        return []
    cases = json.loads((GOLDEN_DIR / "index.json").read_text())["cases"]
    return [case["file"] for case in cases if case["kind"] == kind]


@pytest.fixture(scope="session")
def golden_dir():
    """The golden folder; tests that use it are skipped when it is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden cases not found at {GOLDEN_DIR} (set DW_D2_GOLDEN)")
    return GOLDEN_DIR


def pytest_generate_tests(metafunc):
    """A test argument named ``golden_<kind>_case`` runs once per golden case of that kind and
    receives the loaded case dict (e.g. ``golden_dw_loss_case``)."""
    for name in metafunc.fixturenames:
        if name.startswith("golden_") and name.endswith("_case"):
            kind = name[len("golden_"):-len("_case")]
            files = golden_case_files(kind)
            if files:
                metafunc.parametrize(name, files, ids=files, indirect=True)
            else:
                metafunc.parametrize(name, [pytest.param(None, marks=pytest.mark.skip(
                    reason=f"no golden {kind} cases at {GOLDEN_DIR} (set DW_D2_GOLDEN)"))],
                    indirect=True)


def _load_golden_case(request):
    if request.param is None:
        pytest.skip("golden case missing")
    return torch.load(GOLDEN_DIR / request.param, weights_only=True)


@pytest.fixture
def golden_dw_loss_case(request):
    return _load_golden_case(request)


@pytest.fixture
def golden_autoassign_loss_case(request):
    return _load_golden_case(request)


# The precision the reference cases are stated to: float64 re-implementations agree to ~1e-15
# relative, so 1e-9 is safe; never loosened to make a test pass.
GOLDEN_RTOL = 1e-9


def _assert_golden_close(actual, expected, what):
    assert actual.shape == expected.shape, \
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected), f"{what}: masks differ"
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.detach(), expected, rtol=GOLDEN_RTOL, atol=0,
                               msg=lambda message: f"{what}: {message}")


@pytest.fixture
def assert_golden_close():
    """``assert_golden_close(actual, expected, what)``: masks exactly equal, numbers within
    1e-9 relative (no absolute slack), same shape and dtype."""
    return _assert_golden_close


def _assert_golden_gradients(losses, inputs, golden_grads, what=""):
    """Gradients of each loss in ``losses`` (one autograd graph) with respect to the leaf
    tensors ``inputs`` (name -> tensor) against ``golden_grads`` (loss -> input -> tensor);
    an input a loss does not reach must have a zero golden gradient."""
    for loss_name, expected_grads in golden_grads.items():
        grads = torch.autograd.grad(losses[loss_name], list(inputs.values()),
                                    retain_graph=True, allow_unused=True)
        for (input_name, leaf), grad in zip(inputs.items(), grads):
            grad = torch.zeros_like(leaf) if grad is None else grad
            _assert_golden_close(grad, expected_grads[input_name],
                                 f"{what}d {loss_name} / d {input_name}")


@pytest.fixture
def assert_golden_gradients():
    """``assert_golden_gradients(losses, inputs, golden_grads, what="")``, see above."""
    return _assert_golden_gradients


# Our name of a per-image weight (``return_weights=True``) -> the golden per-image key.
GOLDEN_WEIGHT_KEYS = {
    "candidates": "inside_gt_bbox_mask",
    "center_prior": "center_prior_weights",
    "ious": "ious",
    "pos_weight": "p_pos_weight",
    "neg_weight": "p_neg_weight",
}


def _assert_golden_weights(weights, golden_per_image):
    """Per-image weights returned with ``return_weights=True`` against the golden
    intermediates: the same keys, detached, within the golden tolerance."""
    assert len(weights) == len(golden_per_image)
    for i, (mine, golden) in enumerate(zip(weights, golden_per_image)):
        assert set(mine) == set(GOLDEN_WEIGHT_KEYS)
        for ours, theirs in GOLDEN_WEIGHT_KEYS.items():
            assert not mine[ours].requires_grad
            _assert_golden_close(mine[ours], golden[theirs], f"image {i} {ours}")


@pytest.fixture
def assert_golden_weights():
    """``assert_golden_weights(weights, golden_per_image)``, see above."""
    return _assert_golden_weights


@pytest.fixture
def shapes_subset(tmp_path):
    """``make(split, count, fault=None)``: the first images of a dw_shapes split as a COCO
    dataset of their own, with one planted fault (see ``tests/shapes_subsets.py``)."""
    from tests.shapes_subsets import make_shapes_subset, unregister

    names = []

    def make(split, count, fault=None):
        names.append(f"dw_d2_test_subset_{len(names)}_{fault}")
        return make_shapes_subset(tmp_path / names[-1], names[-1], split, count, fault)

    yield make
    for name in names:
        unregister(name)


@pytest.fixture(scope="session")
def official_checkpoints(tmp_path_factory):
    """``official_checkpoints(name)``: the official model ``name`` of
    ``tests.official_model.OFFICIAL_CASES`` with random weights, saved as MMDetection saves it
    (``.mmdet``) and converted by ``tools/convert_official_checkpoint.py`` run as a user runs it
    (``.converted``, ``.printed``: what it printed). Made once per session and name."""
    import contextlib
    import io
    from types import SimpleNamespace

    from tests.official_model import (OFFICIAL_CASES, OfficialDetector, mmdet_checkpoint,
                                      randomize_)
    from tools import convert_official_checkpoint

    made = {}

    def make(name):
        if name not in made:
            layout, config = OFFICIAL_CASES[name]
            folder = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model = randomize_(OfficialDetector(layout), seed=sorted(OFFICIAL_CASES).index(name))
            source, target = folder / f"{name}_mmdet.pth", folder / f"{name}_d2.pth"
            torch.save(mmdet_checkpoint(model), source)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert convert_official_checkpoint.main([str(source), str(target)]) == 0
            made[name] = SimpleNamespace(layout=layout, config=config, mmdet=source,
                                         converted=target, printed=printed.getvalue())
        return made[name]

    return make
