"""Shared fixtures (small image files built on the fly) and the test tiers.

Tiers, as pytest markers: `unit` (lib functions on tiny inputs, seconds), `data` (datasets,
the generator and the leakage audit: no content shared across splits) and `e2e` (the pipeline
through make and papermill, and training under torchrun: minutes). `make test` runs all three, `make test-unit` the first.
A test module's tier is set below unless the test marks itself.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Under `make test`'s pytest-xdist workers, each worker's processes (and the notebook kernels they start) take an
# equal share of the cores, not all of them: OpenMP threads of two workers on the same cores spin-wait for each
# other, and one two-fold cross-validation took 5x as long as alone. A value set in the environment wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def sem_like(seed: int, size: int = 96) -> np.ndarray:
    """A distinct textured 8-bit image (lines at a random pitch and angle plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, pitch = rng.uniform(0, np.pi), rng.uniform(6, 20)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    img = 0.5 + 0.3 * np.sign(np.sin(2 * np.pi * u / pitch + rng.uniform(0, 6)))
    blobs = rng.normal(0, 1, (6, 6))
    img += 0.15 * np.kron(blobs, np.ones((size // 6 + 1, size // 6 + 1)))[:size, :size]
    img += rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_tree(tmp_path):
    """<tmp>/data/<class>/<class>_<i>.png with n distinct images per class; returns (root, classes)."""

    def build_tree(classes=("bridge", "clean", "vias"), n: int = 6, size: int = 96):
        root = tmp_path / "data"
        for k, cls in enumerate(classes):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(sem_like(1000 * k + i, size)).save(root / cls / f"{cls}_{i:03d}.png")
        return root, list(classes)

    return build_tree


def make_bundle(folder, classes, arch="mobilenet_v2", size=32, threshold=0.5):
    """A deployment bundle (model.onnx, labels, preprocessing, manifest) of an untrained network whose
    classifier weights are spread so that classes differ; returns the model.onnx path."""
    import json

    import torch

    from lib import export, model as net, preprocess

    torch.manual_seed(0)
    m = net.build_model(len(classes), arch=arch, image_size=size).eval()
    torch.nn.init.normal_(m.classifier[1].weight, 0, 1.0)
    export.export_onnx(m, folder / "model.onnx", size=size)
    export.write_labels(folder, classes)
    spec = preprocess.preprocessing_spec(size, resize="letterbox", background=0.25)
    (folder / "preprocessing.json").write_text(json.dumps(spec))
    export.write_bundle_manifest(folder, review_threshold=threshold, int8_fit=True)
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def lite0_bundle(tmp_path_factory):
    """An EfficientNet-Lite0 bundle at 64 px, 3 classes (exported once for the predict and INT8 tests)."""
    return make_bundle(tmp_path_factory.mktemp("lite0"), ["bridge", "clean", "vias"], arch="efficientnet_lite0", size=64)


def make(*args, timeout=900):
    """`make` in the repository root, as a user runs it (no inherited MAKEFLAGS), output captured."""
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.run(["make", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The synthetic smoke route (params/smoke.yaml: MobileNetV2 from scratch, 64 px, three epochs) through
    `make all` into a temporary folder, then `make all` again: (folder, make arguments, first, second)."""
    tmp = tmp_path_factory.mktemp("e2e")
    overlay = tmp / "where.yaml"
    overlay.write_text(f"synthetic_dir: {tmp / 'data'}\n")
    args = [f"PARAMS=params/smoke.yaml {overlay}", f"BUILD={tmp / 'build'}", f"REPORTS={tmp / 'reports'}"]
    first = make("all", *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = make("all", *args)
    return tmp, args, first, second


E2E_MODULES = {"test_pipeline", "test_routes", "test_notebooks", "test_reports", "test_distributed"}
DATA_MODULES = {"test_leakage", "test_synthetic", "test_plant", "test_data", "test_quality", "test_cv"}


# `make test` runs the suite on pytest-xdist workers. Each test goes to the worker of its group, read off its
# id, so that an expensive shared fixture runs once: one own-data route's tests (the route is in the id), every
# module that uses the smoke route, otherwise a module (its module-scoped fixtures).
# tests/test_environment.py checks that every module- or session-scoped fixture stays within one group.
ROUTES = ("presplit_example", "unsplit_default", "presplit_no_test")
SMOKE_RUN = ("tests/test_pipeline.py::", "tests/test_reports.py::", "tests/test_notebooks.py::test_sweep_")
# The groups start slowest first, so that no worker is left with a long one at the end; the rest in file order.
SLOW_GROUPS = ["smoke_run", *ROUTES, "tests/test_notebooks.py", "tests/test_bad_input.py", "tests/test_distributed.py"]


def xdist_group(nodeid: str) -> str:
    path, _, name = nodeid.partition("::")
    if path.endswith("test_routes.py") and name.endswith("]"):
        param = name[name.rindex("[") + 1:-1]
        if param in ROUTES:
            return param
    return "smoke_run" if nodeid.startswith(SMOKE_RUN) else path


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole groups to each worker, in collection order (slowest first, see pytest_collection_modifyitems),
    for `-n N` (whose default is --dist load); another --dist is left to pytest-xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False  # keep the order below, not the largest group first
    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(name) for name in ("unit", "data", "e2e")):
            continue
        module = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker("e2e" if module in E2E_MODULES else "data" if module in DATA_MODULES else "unit")
    rank = {name: i for i, name in enumerate(SLOW_GROUPS)}
    items.sort(key=lambda item: rank.get(xdist_group(item.nodeid), len(rank)))  # stable: file order in a group
