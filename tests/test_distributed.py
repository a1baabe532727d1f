"""Training under torchrun on the gloo backend: 2 processes, each on half of every batch, take the same
steps as 1 process (a deterministic configuration), and the training stage's launcher hands back
rank 0's checkpoint and history."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                    str(ROOT / "tests" / "dist_worker.py"), str(out)], check=True, env=env, cwd=ROOT, timeout=300)
    return torch.load(out, weights_only=False)


def test_two_gloo_processes_on_half_the_data_each_match_one_process(tmp_path):
    one, two = torchrun(1, tmp_path / "one.pt"), torchrun(2, tmp_path / "two.pt")
    assert (one["world"], two["world"]) == (1, 2)
    for a, b in zip(one["history"], two["history"]):  # the figures gathered over both ranks
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_recall"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    for name, w in one["state"].items():
        assert torch.allclose(w, two["state"][name], atol=1e-5), name
    first = one["history"][0]["train_loss"]
    assert one["history"][-1]["train_loss"] < first  # it trained: equal because both learned alike


def test_the_training_stage_hands_training_to_torchrun_and_reads_rank_0_back(tmp_path):
    import pandas as pd
    from PIL import Image

    from conftest import sem_like
    from lib import data, engine, params, recipes

    classes = ["bridge", "clean", "vias"]
    rows = []
    for c, cls in enumerate(classes):
        for i in range(6):
            path = tmp_path / "images" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sem_like(10 * c + i, 48)).save(path)
            rows.append({"path": str(path), "class": cls, "split": "val" if i >= 4 else "train", "group": len(rows)})
    build = tmp_path / "build"
    (build / "split").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(build / "split" / "split.csv", index=False)
    P = {**params.read_file(params.BASE), "classes": classes, "build_dir": str(build), "arch": "mobilenet_v2",
         "width": 0.35, "weights": "none", "recipe": "ft", "image_size": 32, "epochs": 2, "batch_size": 4,
         "nproc_per_node": 2, "device": "cpu"}
    labels = data.label_order(classes)
    out = build / "train"
    out.mkdir()
    trained, seconds = recipes.train_and_checkpoint(P, None, labels, recipes.prepare(P, 3), out / "model.pt",
                                                    device="cpu", generator=engine.seed_everything(0),
                                                    build_dir=build, resume=build / "train.resume.pt",
                                                    resume_key="k")
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # the launch files are cleaned up
    assert len(trained.fit.history) == 2 and trained.fit.best_epoch in (1, 2) and seconds > 0
    assert "2 processes under torchrun" in " ".join(trained.notes)
    assert torch.load(build / "train.resume.pt", weights_only=False)["epoch"] == 2  # rank 0 wrote the state
    assert trained.model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="nproc_per_node"):
        recipes.train_and_checkpoint({**P, "nproc_per_node": 0}, None, labels, None, out / "m.pt", device="cpu",
                                     generator=None, build_dir=build)
