"""End to end: `make all` with params/smoke.yaml into a temporary folder, then the README example."""

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, make

STAGES = ["01_eda", "02_leakage_audit", "03_training", "04_evaluation", "05_export"]


def test_five_reports_and_the_index_exist(smoke_run):
    tmp = smoke_run[0]
    for name in STAGES + ["index"]:
        assert (tmp / "reports" / f"{name}.html").stat().st_size > 1000, name


def test_evaluation_report_holds_recall_table_and_confusion_matrix(smoke_run):
    html = (smoke_run[0] / "reports" / "04_evaluation.html").read_text()
    assert "Per-class recall, precision and F1" in html and "macro avg" in html
    assert "Confusion matrix" in html and "row-normalised" in html
    assert "miss rate (defect -&gt; clean)" in html
    assert len(re.findall(r"data:image/png;base64", html)) >= 5  # recall bars, confusion, reliability, coverage, curves
    for text in ("Headline figures with 95% intervals", "Calibrated confidence", "ECE before (T = 1)",
                 "The operating point", "validation (chosen here)", "accuracy of the auto-classified", "Per class at the operating point",
                 "capture rate (auto)"):
        assert text in html, text
    metrics = json.loads((smoke_run[0] / "build" / "eval" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"bridge", "clean", "CMP(scratch)", "cracks", "LER", "open", "others", "vias"}
    assert [r["figure"] for r in metrics["intervals"]] == ["accuracy", "macro recall", "miss rate", "false-alarm rate"]
    assert metrics["intervals"][0]["value"] == pytest.approx(metrics["accuracy"])
    assert set(metrics["ece"]) == {"before", "after"} and metrics["temperature"] > 0
    fit = metrics["temperature_fit"]  # the temperature is applied only where its interval excludes 1
    assert metrics["temperature_fitted"] == (fit["interval"] is not None and not fit["interval"][0] <= 1 <= fit["interval"][1])


def test_training_ran_every_epoch_moved_the_weights_and_names_them(smoke_run):
    # Whether three epochs of 4 steps lower the smoke run's loss depends on the CPU's float kernels (on one
    # EPYC it rose, 2.127 to 2.142): test_engine checks that training lowers a loss. Here: every epoch ran
    # with finite losses, and the saved weights left their initialisation (zero head bias, BN never run).
    train = smoke_run[0] / "build" / "train"
    summary = json.loads((train / "summary.json").read_text())
    history = pd.read_csv(train / "history.csv")
    assert len(history) == summary["epochs_run"] == 3 and np.isfinite(history[["train_loss", "val_loss"]]).all().all()
    state = torch.load(train / "model.pt", map_location="cpu", weights_only=False)["model"]
    assert state["classifier.1.bias"].abs().max() > 0 and state["features.0.1.num_batches_tracked"] > 0
    assert summary["weights"]["source"] == "none"
    assert "Weights used" in (smoke_run[0] / "reports" / "03_training.html").read_text()
    assert not (smoke_run[0] / "build" / "resume" / "train.pt").exists()  # the stage completed: nothing to resume


def test_onnx_parity_held(smoke_run):
    exp = json.loads((smoke_run[0] / "build" / "export" / "export.json").read_text())
    assert exp["parity"]["argmax_agreement"] == 1.0 and exp["parity"]["images"] > 0
    for f in ("model.onnx", "model.int8.onnx", "labels.json", "label_encoder.pkl", "preprocessing.json",
              "model_card.md", "bundle.json", "benchmark.json"):
        assert (smoke_run[0] / "build" / "export" / f).is_file()


def test_export_report_compares_int8_settings_and_times_three_engines(smoke_run):
    build = smoke_run[0] / "build"
    exp = json.loads((build / "export" / "export.json").read_text())
    assert len(exp["quantization_search"]) == 12 and exp["int8"]["setting"] in {r["setting"] for r in exp["quantization_search"]}
    assert exp["int8"]["chosen_on"] == "val" and isinstance(exp["int8"]["fit"], bool)
    bc = exp["int8"]["bias_correction"]  # on by default: every convolution of the model had its bias corrected
    assert bc["corrected"] == bc["convolutions"] > 0 and bc["mean_abs_shift"] > 0
    assert exp["int8"]["bytes"] < 0.4 * exp["bytes"] and exp["compute"]["macs"] > 0
    bench = json.loads((build / "export" / "benchmark.json").read_text())
    assert {(r["engine"], r["batch"]) for r in bench["rows"]} == {
        (e, b) for e in ("PyTorch eager FP32", "ONNX Runtime FP32", "ONNX Runtime INT8") for b in (1, 8)}
    assert bench["machine"]["threads"] >= 1 and len(bench["machine"]["load_average_before"]) == 3
    html = (smoke_run[0] / "reports" / "05_export.html").read_text()
    for text in ("INT8: the quantisation settings compared", "U8S8 reduce_range Entropy", "S8S8 Percentile",
                 "INT8 against FP32: the recall-first gate", "INT8 − FP32 (points)", "Latency: PyTorch eager, ONNX Runtime FP32 and INT8",
                 "multiply-adds", "were corrected for their weights' int8 rounding"):
        assert text in html, text
    assert len(re.findall(r"data:image/png;base64", html)) >= 1  # the latency plot
    card = (build / "export" / "model_card.md").read_text()
    dataset = json.loads((build / "dataset.json").read_text())
    for text in (dataset["fingerprint"]["sha256"], "random initialisation", "## Latency", "macro recall",
                 exp["int8"]["setting"], "Date: ", "corrected for the weights' rounding"):
        assert text in card, text
    manifest = json.loads((build / "export" / "bundle.json").read_text())
    evaluated = json.loads((build / "eval" / "metrics.json").read_text())
    assert manifest["review_threshold"] == evaluated["review_threshold"] == evaluated["operating_point"]["validation"]["threshold"]
    assert manifest["temperature"] == evaluated["temperature"] > 0 and "model.int8.onnx" in manifest["files"]
    assert "### Confidence and review" in card and "with 95% intervals" in card


@pytest.mark.parametrize("model", ["model.onnx", "model.int8.onnx"])
def test_predict_command_matches_the_evaluation_notebook(smoke_run, tmp_path, model):
    """lib.predict on the test split gives the evaluation notebook's predictions (FP32 exactly;
    INT8 as often as the export report's agreement says)."""
    import pandas as pd

    build = smoke_run[0] / "build"
    evaluated = pd.read_csv(build / "eval" / "predictions.csv")
    out = tmp_path / "rows.csv"
    run = subprocess.run([sys.executable, "-m", "lib.predict", str(build / "export" / model), *evaluated["path"],
                          "--out", str(out), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = pd.read_csv(out)
    assert rows["file"].tolist() == evaluated["path"].tolist()
    if model == "model.onnx":
        assert rows["predicted"].tolist() == evaluated["predicted"].tolist()
        assert (rows["confidence"] - evaluated["confidence"]).abs().max() < 1e-4
    else:
        agreement = json.loads((build / "export" / "export.json").read_text())["int8"]["agreement"]["agreement"]
        assert (rows["predicted"] == evaluated["predicted"]).mean() == pytest.approx(agreement)


def test_split_has_zero_overlap_and_params_are_saved(smoke_run):
    build = smoke_run[0] / "build"
    for stage in ("eda", "split", "train", "eval", "export"):
        assert (build / stage / "params.json").is_file(), stage
    assert "No file in one split matches a file in another split" in (smoke_run[0] / "reports" / "02_leakage_audit.html").read_text()


def test_second_make_reruns_nothing(smoke_run):
    second = smoke_run[3]
    assert second.returncode == 0
    assert "lib.notebooks" not in second.stdout and "lib.index" not in second.stdout


def test_index_links_the_reports_and_shows_headline_figures(smoke_run):
    html = (smoke_run[0] / "reports" / "index.html").read_text()
    for name in STAGES:
        assert f"href='{name}.html'" in html
    for label in ("test accuracy", "macro recall", "miss rate", "ONNX size", "latency", "wall time"):
        assert label in html


def test_readme_inference_example_runs_as_written(smoke_run, tmp_path):
    """The README's code block, unchanged, run where build/export and data/synthetic exist."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- inference-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lacks the marked inference example"
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "export").symlink_to(smoke_run[0] / "build" / "export")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(smoke_run[0] / "data")
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    classes = json.loads((smoke_run[0] / "build" / "export" / "labels.json").read_text())
    assert out.stdout.strip().splitlines()[-1] in classes


@pytest.fixture(scope="module")
def presplit_with_leak(tmp_path_factory):
    """train/valid/test folders (class folders spelled differently per split) with one train image
    copied into test."""
    from PIL import Image

    from conftest import sem_like

    root = tmp_path_factory.mktemp("presplit") / "data"
    spellings = {"train": ("vias", "clean", "bridge"), "valid": ("Vias", "clean", "Bridge"),
                 "test": ("VIAS", "Clean", "bridge")}
    for s, (split, folders) in enumerate(spellings.items()):
        for k, folder in enumerate(folders):
            (root / split / folder).mkdir(parents=True)
            for i in range(4 if split == "train" else 3):
                Image.fromarray(sem_like(10000 * s + 100 * k + i, 96)).save(root / split / folder / f"img_{s}{k}{i}.png")
    leaked = root / "test" / "VIAS" / "leaked_copy.png"
    leaked.write_bytes((root / "train" / "vias" / "img_000.png").read_bytes())
    # every kind of bad file: the stages must list them and carry on
    bad = root / "train" / "clean"
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    good = (bad / "img_010.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    return root, leaked


def test_presplit_leak_fails_the_audit_naming_the_files(presplit_with_leak, tmp_path):
    """on_leak: fail (the default) stops at the audit and lists the shared files; drop and report
    are tests/test_leakage.py's."""
    root, leaked = presplit_with_leak
    overlay = tmp_path / "p.yaml"
    overlay.write_text(f"data_dir: {root}\nclasses: [bridge, clean, vias]\non_leak: fail\n")
    out = make("audit", f"PARAMS=params/smoke.yaml {overlay}", f"BUILD={tmp_path / 'b'}", f"REPORTS={tmp_path / 'r'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "LeakageError" in out.stderr and "cross-split matches remain" in out.stderr
    assert str(leaked) in out.stderr and "on_leak: drop" in out.stderr
    eda = (tmp_path / "r" / "01_eda.html").read_text()
    for name in ("empty.png", "notes.png", "truncated.png"):
        assert name in eda
    assert "empty file (0 bytes)" in eda and "cannot identify image file" in eda
    assert not (tmp_path / "b" / "split").exists() and not (tmp_path / "r" / "02_leakage_audit.html").exists()


def test_a_notebook_run_as_in_jupyterlab_reproduces_its_report_and_make_sees_it(smoke_run, tmp_path):
    """Run from notebooks/, with the notebook's own defaults (only the build folder named) and without
    make's resolved parameters, as JupyterLab runs it: the figures are the report's, no path setup is
    needed, and make then knows the stage's outputs are no longer the ones its report shows.
    (Last in this module: it ends by running make again, which restores the smoke build.)"""
    import os

    import papermill

    from lib.params import RESOLVED_ENV

    tmp, args = smoke_run[0], smoke_run[1]
    before = json.loads((tmp / "build" / "eval" / "metrics.json").read_text())
    assert RESOLVED_ENV not in os.environ
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_evaluation.ipynb"), str(tmp_path / "lab.ipynb"),
                               parameters={"build_dir": str(tmp / "build")}, cwd=str(ROOT / "notebooks"),
                               kernel_name="python3", progress_bar=False)
    assert json.loads((tmp / "build" / "eval" / "metrics.json").read_text()) == before
    recorded = json.loads((tmp / "build" / "eval" / "params.json").read_text())
    assert recorded["gallery_max"] == 24  # the notebook's default, recorded as what this run used
    assert make("-q", "eval", *args).returncode != 0
    again = make("all", *args)
    assert again.returncode == 0 and "notebooks/04_evaluation.ipynb" in again.stdout
    assert "notebooks/03_training.ipynb" not in again.stdout
