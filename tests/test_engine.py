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


class _Tiny(nn.Module):
    """features / classifier like the real networks, with BatchNorm and dropout (RNG and buffers matter)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


def _stripes():
    """24 noisy 32-px images of 3 classes, each with a learnable bright stripe of its own."""
    y = np.repeat(np.arange(3), 8)
    gray = np.random.default_rng(0).random((24, 1, 32, 32), dtype=np.float32) * 0.3
    for c in range(3):
        gray[y == c, :, :, c * 10: c * 10 + 8] += 0.5
    return gray, y


def _train(resume=None, key="run", kill_after=None, epochs=6):
    """A deterministic fit with augmentation noise, dropout and EMA; `kill_after` stops the process's
    training right after that epoch's state is saved, as a kill would."""
    g = engine.seed_everything(0)
    gray, y = _stripes()
    model = _Tiny()
    noisy = engine.GrayDataset(gray, y, transform=lambda x: (x + 0.05 * torch.randn_like(x)).clamp(0, 1))
    train = engine.make_loader(noisy, batch_size=8, train=True, generator=g)
    val = engine.make_loader(engine.GrayDataset(gray, y), batch_size=24, train=False, generator=g)
    bests = []

    def after(epoch):
        if epoch == kill_after:
            raise KeyboardInterrupt

    res = engine.fit(model, train, val, n_classes=3, epochs=epochs, lr=3e-3, weight_decay=0.01, warmup_epochs=1,
                     patience=10, device="cpu", criterion=nn.CrossEntropyLoss(label_smoothing=0.1),
                     on_best=lambda m, e, v: bests.append((e, {k: t.clone() for k, t in m.state_dict().items()})),
                     progress=False, ema_decay=0.9, resume=resume, resume_key=key, after_epoch=after)
    return res, bests


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_training_resumes_from_its_last_epoch_and_matches_an_uninterrupted_one(tmp_path):
    full, full_bests = _train()
    state = tmp_path / "build" / "train.resume.pt"
    try:
        _train(resume=state, kill_after=3)
        raise AssertionError("the kill did not happen")
    except KeyboardInterrupt:
        pass
    assert state.is_file() and torch.load(state, weights_only=False)["epoch"] == 3
    resumed, resumed_bests = _train(resume=state)
    assert len(resumed.history) == len(full.history) == 6
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert drop(resumed.history) == drop(full.history)
    assert (resumed.best_epoch, resumed.best_val_macro_recall) == (full.best_epoch, full.best_val_macro_recall)
    assert _same(resumed.last.state_dict(), full.last.state_dict())  # the EMA weights, bit for bit
    assert resumed_bests[0][0] <= 3 and _same(resumed_bests[-1][1], full_bests[-1][1])  # best re-handed, then same
    # a state saved by another run (other parameters or data) is not resumed from
    assert torch.load(state, weights_only=False)["epoch"] == 6
    other, _ = _train(resume=state, key="another run")
    assert drop(other.history) == drop(full.history) and _same(other.last.state_dict(), full.last.state_dict())


def test_mixed_precision_paths_train_and_record_their_throughput():
    """bf16 autocast and fp16 with a gradient scaler (the CUDA defaults) run through the same fit on
    CPU; the default on CPU is fp32."""
    assert engine.precision_for("cpu") == "fp32" and engine.precision_for("cpu", "bf16") == "bf16"
    for precision in ("bf16", "fp16"):
        g = engine.seed_everything(0)
        gray, y = _stripes()
        loader = engine.make_loader(engine.GrayDataset(gray, y), batch_size=8, train=True, generator=g)
        res = engine.fit(_Tiny(), loader, None, n_classes=3, epochs=3, lr=3e-3, weight_decay=0.0, warmup_epochs=1,
                         patience=10, device="cpu", criterion=nn.CrossEntropyLoss(), on_best=lambda *a: None,
                         progress=False, precision=precision)
        assert res.precision == precision and res.images_per_second > 0
        assert res.history[-1]["train_loss"] < res.history[0]["train_loss"], precision


def test_a_run_that_early_stopping_ended_stays_ended_when_resumed(tmp_path):
    """Killed after its last (early-stopped) epoch, e.g. while writing its artifacts: the rerun trains no more."""
    state = tmp_path / "state.pt"

    def run(**kw):
        g = engine.seed_everything(0)
        y = np.repeat(np.arange(3), 8)
        gray = np.random.default_rng(0).random((24, 1, 32, 32), dtype=np.float32)  # nothing to learn: stops early
        loader = engine.make_loader(engine.GrayDataset(gray, y), batch_size=8, train=True, generator=g)
        val = engine.make_loader(engine.GrayDataset(gray, y), batch_size=24, train=False, generator=g)
        return engine.fit(_Tiny(), loader, val, n_classes=3, epochs=30, lr=1e-4, weight_decay=0.0, warmup_epochs=1,
                          patience=2, device="cpu", criterion=nn.CrossEntropyLoss(), on_best=lambda *a: None,
                          progress=False, resume=state, resume_key="k", **kw)

    first = run()
    assert first.stopped_early and len(first.history) < 30
    again = run()
    assert again.stopped_early and len(again.history) == len(first.history)
    assert again.images_per_second == first.images_per_second


def test_the_epoch_bar_writes_a_few_lines_not_two_per_epoch(capsys):
    """A rendered report keeps every refresh of the bar as a line: a fast 20-epoch fit shows its start
    and its end (with the last losses), not 40 refreshes."""
    g = engine.seed_everything(0)
    gray, y = _stripes()
    loader = engine.make_loader(engine.GrayDataset(gray, y), batch_size=8, train=True, generator=g)
    val = engine.make_loader(engine.GrayDataset(gray, y), batch_size=24, train=False, generator=g)
    engine.fit(_Tiny(), loader, val, n_classes=3, epochs=20, lr=3e-3, weight_decay=0.0, warmup_epochs=1,
               patience=50, device="cpu", criterion=nn.CrossEntropyLoss(), on_best=lambda *a: None, progress=True)
    refreshes = [s for s in capsys.readouterr().err.replace("\r", "\n").split("\n") if s.startswith("epochs:")]
    assert 2 <= len(refreshes) <= 4, refreshes
    assert refreshes[-1].startswith("epochs: 100%") and "20/20" in refreshes[-1] and "val_recall=" in refreshes[-1]


def test_mixup_blends_each_image_with_one_other_and_mixes_the_loss_alike():
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    torch.manual_seed(0)
    model = Recording()
    x, y = torch.eye(8).reshape(8, 8, 1, 1), torch.arange(8)  # image i is the unit vector of class i
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: the loss can be recomputed
    scheduler = engine.warmup_cosine(optimizer, warmup_steps=1, total_steps=4)
    plain = engine.train_one_epoch(model, [(x, y)], nn.CrossEntropyLoss(), optimizer, scheduler, "cpu")
    assert torch.equal(seen[0], x) and plain["seen"] == 8
    mixed = engine.train_one_epoch(model, [(x, y)], nn.CrossEntropyLoss(), optimizer, scheduler, "cpu", mixup=1.0)
    blend = seen[1].flatten(1)
    lam = blend.diagonal()  # each image keeps the larger share of itself ...
    assert torch.allclose(lam, lam[0].expand(8)) and 0.5 <= lam[0] < 1.0
    partner = (blend - torch.diag(lam)).argmax(1)  # ... and takes the rest from one other image
    assert sorted(partner.tolist()) == list(range(8)) and (partner != torch.arange(8)).any()
    assert torch.allclose(blend.sum(1), torch.ones(8))
    logits = model.linear(blend)
    expected = lam[0] * nn.functional.cross_entropy(logits, y) + (1 - lam[0]) * nn.functional.cross_entropy(logits, partner)
    assert abs(mixed["loss"] - expected.item()) < 1e-5
