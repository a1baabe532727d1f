"""The engine: a few training steps lower the loss; evaluation and logits agree; curves are read."""

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib import engine


def test_a_few_training_steps_lower_the_loss():
    g = engine.seed_everything(0)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    gray = rng.random((24, 1, 32, 32), dtype=np.float32) * 0.2
    for c in range(3):
        gray[y == c, :, :, c * 10: c * 10 + 8] += 0.7  # a learnable stripe per class
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 3))  # small and without BatchNorm: the engine is what is tested
    gray = np.clip(gray, 0, 1)
    loader = engine.make_loader(engine.GrayDataset(gray, y), batch_size=8, train=True, generator=g)
    scored = engine.make_loader(engine.GrayDataset(gray, y), batch_size=24, train=False, generator=g)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = engine.warmup_cosine(optimizer, warmup_steps=1, total_steps=8 * len(loader))
    before = engine.evaluate(model, scored, criterion, "cpu", 3)["loss"]
    for _ in range(8):
        engine.train_one_epoch(model, loader, criterion, optimizer, scheduler, "cpu")
    ev = engine.evaluate(model, scored, criterion, "cpu", 3)
    assert ev["loss"] < 0.7 * before, (before, ev["loss"])
    from lib.preprocess import normalize

    assert (engine.logits(model, normalize(gray)).argmax(1) == y).mean() == ev["accuracy"]


def test_curves_are_read_for_over_fitting_and_a_probe_has_none():
    over = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.1], "val_loss": [0.9, 0.8, 1.5],
                         "train_accuracy": [0.5, 0.9, 1.0], "val_accuracy": [0.5, 0.6, 0.55]})
    assert "over-fitting" in " ".join(engine.read_curves(over))
    probe = pd.DataFrame({"epoch": [0], "train_loss": [None], "val_loss": [None], "train_accuracy": [None],
                          "val_accuracy": [0.8]})
    notes = engine.read_curves(probe, test_accuracy=0.7, best_val_macro_recall=0.75)
    assert "No training curves to read" in notes[0] and "Test accuracy 0.700" in notes[-1]
