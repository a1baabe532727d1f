"""Explanations: Grad-CAM maps, nearest neighbours, and the label-issue ranking find what they should."""

import numpy as np
import torch

from lib import explain, model as net, params


def test_label_issues_rank_planted_wrong_labels_first():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 16))
    y = np.repeat(np.arange(3), 60)
    feats = centres[y] + rng.normal(0, 1, (180, 16))
    flipped = np.array([5, 70, 130])
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3
    prob = explain.out_of_fold_probe(feats, given, 3, groups=np.arange(180))
    assert prob.shape == (180, 3) and np.allclose(prob.sum(1), 1)
    issues = explain.label_issues(given, prob, ["a", "b", "c"])
    assert set(issues["position"][:3]) == set(flipped)
    assert (issues.set_index("position").loc[flipped, "suggested"].to_numpy() == np.array(["a", "b", "c"])[y[flipped]]).all()


def test_nearest_finds_the_copy():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 8))
    idx, dist = explain.nearest(train, train[[7, 21]] * 2.0, k=2)  # a scaled copy: cosine distance 0
    assert idx[:, 0].tolist() == [7, 21] and np.allclose(dist[:, 0], 0, atol=1e-9)


def test_gradcam_maps_are_per_image_on_0_1_and_follow_the_target():
    torch.manual_seed(0)
    m = net.build_model(3, image_size=64).eval()
    gray = np.random.default_rng(2).random((4, 1, 64, 64)).astype(np.float32)
    maps = explain.gradcam(m, gray, np.array([0, 1, 2, 0]))
    assert maps.shape == (4, 64, 64) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert not any(p.grad is not None for p in m.parameters())  # no gradients left on the model


def test_label_issues_and_gradcam_print_no_tqdm_warning_inside_a_kernel():
    # cleanlab and captum import tqdm.auto, which warns into the rendered report when it finds a
    # Jupyter kernel and no ipywidgets; a fresh interpreter posing as such a kernel must stay quiet
    import subprocess
    import sys

    code = """
import sys, types, warnings
shell = types.ModuleType("ipykernel.zmqshell")
sys.modules["ipykernel.zmqshell"] = shell
class ZMQInteractiveShell: pass
import IPython
IPython.get_ipython = lambda: ZMQInteractiveShell()
sys.modules["ipywidgets"] = None  # as in the project's environment: not installed
import numpy as np
from lib import explain, model as net
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explain.label_issues(np.array([0, 1, 0, 1]), np.full((4, 2), 0.5), ["a", "b"])
    explain.gradcam(net.build_model(2, image_size=32).eval(), np.zeros((1, 1, 32, 32), np.float32), np.array([0]))
print([str(w.message) for w in caught])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(params.ROOT))
    assert "IProgress" not in out.stdout + out.stderr, out.stdout + out.stderr
