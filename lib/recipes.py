"""Recipes: how a network learns from its initial weights, behind one entry point.

- `probe`: the pretrained body stays frozen; a multinomial logistic regression (scikit-learn) on
  its pooled features becomes the linear head;
- `lpft`: that probe, then fine-tuning of the whole network from it (body at a lower learning
  rate, the first blocks optionally frozen);
- `partial`: that probe, then fine-tuning of the top blocks only, on the frozen trunk's
  activations computed once per image and augmented view (`cache_views`): many epochs for the
  price of a few;
- `ft`: everything trains from the start (what random weights need).

Any recipe but probe can learn from cross-fitted soft targets (`distill` > 0, `distill_targets`):
its own configuration, trained on one half of the training groups, predicts the other half.

`prepare` builds the model and loads its weights (`lib.model`); `train_recipe` runs the recipe
with the engine (`lib.engine`). The training notebook and cross-validation share both.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib import params
from lib.engine import (FitResult, GrayDataset, SoftTargetLoss, batched, class_weights, fit, make_loader,
                        precision_for)
from lib.preprocess import normalize
from lib.presets import augmentation


def body_blocks(model: nn.Module) -> list[nn.Module]:
    """The body's blocks in input-to-output order (stem first), the units `freeze` counts."""
    if getattr(model, "arch", "mobilenet_v2") == "mobilenet_v2":
        return list(model.features)
    net = model.features  # EfficientNet-Lite: stem (conv + BN), MBConv blocks, head conv (+ BN)
    return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]


def freeze(model: nn.Module, n_blocks: int | None = None) -> list[nn.Module]:
    """Stop gradients into the first n_blocks body blocks (all of them when None); return them.

    Pass the result to `fit(frozen=...)` so they also keep BatchNorm in eval mode.
    """
    blocks = body_blocks(model)
    chosen = blocks if n_blocks is None else blocks[:n_blocks]
    for block in chosen:
        for p in block.parameters():
            p.requires_grad_(False)
    return chosen


@torch.inference_mode()
def pooled_features(model: nn.Module, gray: np.ndarray, device="cpu", batch_size: int = 64,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """Pooled body features [N, F] of cached grayscale images [N, 1, H, W] (or of those `rows`),
    body in eval mode, read a batch at a time."""
    was_training = model.training
    model.eval().to(device)
    take = (lambda i, j: gray[i:j]) if rows is None else (lambda i, j: gray[rows[i:j]])

    def features(i, j):
        x = normalize(torch.from_numpy(np.ascontiguousarray(take(i, j))).float().to(device))
        return model.pool(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

    out = batched(features, len(gray) if rows is None else len(rows), batch_size)
    model.train(was_training)
    return out


def linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, *, balanced: bool = True,
                 c: float = 1.0, seed: int = 0):
    """Multinomial logistic regression on standardised frozen features (scikit-learn).

    Returns (weight [C, F], bias [C]) acting on the raw features, ready for the linear head,
    and the fitted pipeline (for `predict_proba` on features).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present = np.unique(labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, random_state=seed,
                                                             class_weight="balanced" if balanced else None))
    clf.fit(features, labels)
    scaler, lr = clf[0], clf[1]
    w = np.zeros((n_classes, features.shape[1]), np.float32)
    b = np.full(n_classes, -30.0, np.float32)  # a class absent from training is never predicted
    coef, intercept = lr.coef_, lr.intercept_
    if len(present) == 2:  # scikit-learn's binary form: one row for the second class
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    w[present] = coef / scale
    b[present] = intercept - (coef * scaler.mean_ / scale).sum(1)
    return w, b, clf


def set_head(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    """Load a linear probe's (weight, bias) into the model's linear head."""
    linear = model.classifier[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))


def probe_history(probe: dict | None, seconds: float) -> "pd.DataFrame":
    """The training history of a probe: one row, epoch 0, its validation figures and no losses
    (nothing was trained by gradient descent)."""
    import pandas as pd

    probe = probe or {}
    return pd.DataFrame([{"epoch": 0, "train_loss": None, "train_accuracy": None, "val_loss": None,
                          "val_accuracy": probe.get("val_accuracy"), "val_macro_recall": probe.get("val_macro_recall"),
                          "lr": 0.0, "seconds": seconds}])


RECIPES = ("ft", "lpft", "partial", "probe")


class ViewDataset(torch.utils.data.Dataset):
    """Cached trunk activations [N, V, C, H, W] (float16, in memory or a `lib.cache.DiskArray`) and
    labels: each draw of an item is one of its V views, chosen at random (view 0, the image itself,
    when V is 1); with `targets` [N, C], an item's target is its row there instead of its label."""

    def __init__(self, acts, labels: np.ndarray, targets: np.ndarray | None = None):
        self.acts = acts
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.targets = None if targets is None else torch.tensor(np.asarray(targets), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.acts.shape[1], ())) if self.acts.shape[1] > 1 else 0
        return torch.from_numpy(self.acts[i, v].astype(np.float32)), \
            self.labels[i] if self.targets is None else self.targets[i]


@torch.inference_mode()
def trunk_views(model: nn.Module, gray, k: int, views: int, augment=None, device="cpu",
                batch_size: int = 32, path=None):
    """The first k body units' activations of every image [N, views, C, H, W] (float16): view 0 is
    the image itself, the others are augmented draws of it (`augment`, on the grayscale image).
    With `path`, they are written there (`lib.cache.write`, one batch in memory at a time) and
    come back as a `lib.cache.DiskArray`; otherwise as an array in memory."""
    from lib import cache
    from lib import model as net

    model.eval().to(device)

    def batches():
        for i in range(0, len(gray), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(gray[i : i + batch_size])).float()
            out = []
            for v in range(views):
                x = chunk if v == 0 else torch.stack([augment(g) for g in chunk])
                a = net.trunk(model, normalize(x.to(device)).contiguous(memory_format=torch.channels_last), k)
                out.append(a.float().cpu().numpy().astype(np.float16))
            yield np.stack(out, axis=1)

    it = batches()
    first = next(it, None)
    if first is None:
        return np.zeros((0, views), np.float16)
    shape = (len(gray), *first.shape[1:])
    if path is not None:
        return cache.DiskArray(cache.write(path, shape, np.float16, itertools.chain([first], it)))
    acts = np.empty(shape, np.float16)
    i = 0
    for b in itertools.chain([first], it):
        acts[i : i + len(b)], i = b, i + len(b)
    return acts


@dataclass
class Trained:
    model: nn.Module  # after the last epoch (the EMA when used); on_best received the best one
    weights: dict
    recipe: str  # the recipe that ran (probe and lpft become ft without pretrained weights)
    probe: dict | None = None  # the linear probe's validation metrics: the floor to beat
    fit: FitResult | None = None
    notes: list[str] = field(default_factory=list)


def prepare(P: dict, n_classes: int, *, build_dir="build") -> Trained:
    """Build the model the parameters name and load its initial weights (not yet trained).

    `weights` and `notes` say what was loaded and which recipe will run: probe and lpft need
    pretrained features and become ft when the weights are random.
    """
    from lib import model as net

    model = net.build_model(n_classes, arch=P["arch"], width=P["width"], dropout=P["dropout"],
                            image_size=P["image_size"])
    weights = net.init_weights(model, P["weights"], fallback=P["weights_fallback"],
                               sha256=P["weights_sha256"] or None, build_dir=build_dir)
    out = Trained(model=model, weights=weights, recipe=P["recipe"])
    if out.recipe != "ft" and weights["source"] == "none":
        out.notes.append(f"Recipe `{out.recipe}` needs pretrained features, but the weights are random: "
                         f"trained with recipe `ft` (from scratch) instead.")
        out.recipe = "ft"
    return out


def train_recipe(P: dict, gray: dict, y: dict, n_classes: int, *, scratch_dir=None, **kwargs) -> Trained:
    """Train the model `prepare` gives (or `prepared`) by its recipe.

    gray / y: {"train": ..., "val": ...} cached grayscale images and labels; "val" may be
    missing (cross-validation trains a fixed number of epochs). Recipes:
    - probe: frozen body, multinomial logistic regression on its pooled features as the head;
    - lpft: the probe, then fine-tuning of the whole network from it (body at lr * body_lr_mult,
      the first freeze_blocks blocks frozen), with label smoothing and optional EMA;
    - ft: the head starts at random and everything trains at lr (training from scratch).
    `on_best(model, epoch, val_metrics)` receives each new best model (see `fit`).
    `features` ({"train": ..., "val": ...}) are the pooled features of the same images under
    the initial weights, when the caller already has them (cross-validation reuses them
    across folds); otherwise the probe computes them.
    `resume` / `resume_key` / `after_epoch`: the epoch-level training state (see `fit`); the
    probe and the trunk cache are recomputed on a resume (deterministic from the seed).
    `dist` (`lib.distributed.Dist`, under torchrun): every rank computes the probe and the trunk
    cache; each trains on its share of every batch (batch_size / world images).
    `scratch_dir` (a folder the project owns, created when missing): the `partial` recipe's trunk
    activations go to files there, read a batch at a time and removed when training ends, so that
    memory does not grow with the number of images; without it they stay in memory.
    `groups`: the training images' duplicate groups, which `distill` > 0 keeps together when it
    cross-fits its teachers (`distill_targets`).
    """
    if scratch_dir is None:
        return _train_recipe(P, gray, y, n_classes, scratch=None, **kwargs)
    with _scratch(scratch_dir) as scratch:
        return _train_recipe(P, gray, y, n_classes, scratch=scratch, **kwargs)


@contextlib.contextmanager
def _scratch(scratch_dir):
    """A fresh folder for this process's scratch files under scratch_dir, removed on leaving; the
    folders of processes that are gone (a killed training) are removed first."""
    import os
    import shutil
    import tempfile

    from lib.io import claim

    root = claim(scratch_dir, "training scratch")
    for old in root.glob(".trunk-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".trunk-{os.getpid()}-", dir=root) as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


DISTILL_FOLDS = 2  # cross-fitted teachers per training, each trained on the other half of the groups


class Rows:
    """Rows `idx` of an image array or a `lib.cache.DiskArray`, read only when indexed (what
    `GrayDataset`, `trunk_views` and `pooled_features` read), so a teacher's half of a disk-backed
    training set is not copied into memory."""

    def __init__(self, gray, idx: np.ndarray):
        self.gray, self.idx = gray, np.asarray(idx)
        self.shape = (len(self.idx), *gray.shape[1:])

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key):
        return self.gray[self.idx[key]]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.gray[self.idx], dtype=dtype)


def distill_targets(P: dict, gray, y: np.ndarray, n_classes: int, *, groups=None, device, build_dir="build",
                    scratch=None) -> tuple[np.ndarray, str]:
    """Soft targets for the training images [N, C]: (1 - distill) x the one-hot label + distill x the
    class probabilities (softmax of logits / distill_temperature) that a teacher gives the image
    without having trained on it. Each of DISTILL_FOLDS teachers is this configuration with distill
    off (seed + 1 + i), trained for all `epochs` (no validation) on the other folds of a stratified
    group split of the training images; `groups` are their duplicate groups, so that no copy of an
    image teaches its own target (without them each image is its own group). The teachers cost about
    one more training of the same configuration (each sees half the images); under torchrun every
    process computes them (the same targets: same seeds). The random state of Python, numpy, torch
    and CUDA is as before on return. Returns (targets, a note with the teachers' macro recall on
    the images they predicted)."""
    import shutil

    from sklearn.model_selection import StratifiedGroupKFold

    from lib.engine import _rng_states, _set_rng_states, logits, seed_everything
    from lib.metrics import macro_recall

    params.check_keys(P, ("distill", "distill_temperature"))
    y = np.asarray(y)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    if len(groups) != len(y):
        raise ValueError(f"distill: {len(groups)} groups for {len(y)} training images")
    if len(np.unique(groups)) < DISTILL_FOLDS:
        raise ValueError(f"parameter 'distill' needs at least {DISTILL_FOLDS} duplicate groups of training images "
                         f"to cross-fit its teachers, found {len(np.unique(groups))}")
    state = _rng_states(None)
    proba = np.zeros((len(y), n_classes), np.float32)
    split = StratifiedGroupKFold(DISTILL_FOLDS, shuffle=True, random_state=P["seed"] % 2**32)
    try:
        for i, (tr, te) in enumerate(split.split(np.zeros(len(y)), y, groups)):
            TP = {**P, "distill": 0.0, "seed": P["seed"] + 1 + i}
            where = None if scratch is None else Path(scratch) / f"teacher{i}"
            if where is not None:
                where.mkdir(exist_ok=True)
            teacher = _train_recipe(TP, {"train": Rows(gray, tr)}, {"train": y[tr]}, n_classes, device=device,
                                    generator=seed_everything(TP["seed"], P["deterministic"]), progress=False,
                                    build_dir=build_dir, scratch=where)
            z = batched(lambda a, b: logits(teacher.model, normalize(gray[te[a:b]]), device=device), len(te), 256)
            proba[te] = torch.softmax(torch.from_numpy(z) / P["distill_temperature"], 1).numpy()
            del teacher
            if where is not None:
                shutil.rmtree(where, ignore_errors=True)
    finally:
        _set_rng_states(state, None)
    targets = (1.0 - P["distill"]) * np.eye(n_classes, dtype=np.float32)[y] + P["distill"] * proba
    note = (f"Trained towards cross-fitted soft targets (`distill` {P['distill']:g}, temperature "
            f"{P['distill_temperature']:g}): {DISTILL_FOLDS} teachers of this configuration, each trained on "
            f"{DISTILL_FOLDS - 1}/{DISTILL_FOLDS} of the training groups, scored macro recall "
            f"{macro_recall(y, proba.argmax(1), n_classes):.3f} on the training images they predicted.")
    return targets.astype(np.float32), note


def _train_recipe(P: dict, gray: dict, y: dict, n_classes: int, *, device, generator, on_best=None,
                  progress: bool = True, build_dir="build", prepared: Trained | None = None,
                  features: dict | None = None, resume=None, resume_key: str = "", after_epoch=None,
                  dist=None, scratch=None, groups=None) -> Trained:
    from lib.metrics import macro_recall

    out = prepared or prepare(P, n_classes, build_dir=build_dir)
    targets = None
    if P.get("distill", 0) and out.recipe != "probe":
        targets, note = distill_targets(P, gray["train"], y["train"], n_classes, groups=groups, device=device,
                                        build_dir=build_dir, scratch=scratch)
        out.notes.append(note)
    elif P.get("distill", 0):
        out.notes.append("`distill` is ignored by recipe probe: its logistic regression fits the labels.")
    model = out.model.to(device)
    has_val = "val" in gray and len(gray["val"]) > 0
    on_best = on_best or (lambda *a: None)
    counts = np.bincount(y["train"], minlength=n_classes)
    rows = probe_rows(y["train"], PROBE_MAX_IMAGES, P["seed"])
    top, acts = None, {}
    if out.recipe == "partial":
        from lib import model as net

        k = P["freeze_blocks"]
        top = net.Top(model, k)  # checks k
        freeze(model, k)
        acts = {s: trunk_views(model, gray[s], k, P["cache_views"] if s == "train" else 1,
                               augmentation(P) if s == "train" else None, device,
                               path=None if scratch is None else scratch / f"trunk_{s}.npy") for s in gray}
        if P["bn_adapt"]:
            adapt_batchnorm(top, acts["train"], device)
            out.notes.append(f"The BatchNorm statistics of the {net.units(model) - k} trained blocks were re-estimated "
                             f"on the cached training activations ({acts['train'].shape[1]} views of each image) before "
                             f"the probe (`bn_adapt`).")
        features = {s: _top_features(top, acts[s], device, rows=rows if s == "train" else None) for s in acts}
    if out.recipe in ("probe", "lpft", "partial"):
        features = features or {}
        feats = features.get("train")
        if feats is None:
            feats = pooled_features(model, gray["train"], device, rows=rows)
        elif rows is not None and len(feats) == len(y["train"]):  # a caller's features of every image
            feats = feats[rows]
        if rows is not None:
            out.notes.append(f"The linear probe was fit on a class-stratified sample of {len(rows):,} of the "
                             f"{len(y['train']):,} training images (`PROBE_MAX_IMAGES` in lib/recipes.py).")
        w, b, clf = linear_probe(feats, y["train"] if rows is None else y["train"][rows], n_classes,
                                 balanced=P["class_weights"], c=P["probe_c"], seed=P["seed"])
        set_head(model, w, b)
        if has_val:
            val_pred = clf.predict(features["val"] if "val" in features else pooled_features(model, gray["val"], device))
            out.probe = {"val_macro_recall": macro_recall(y["val"], val_pred, n_classes),
                         "val_accuracy": float((val_pred == y["val"]).mean())}
        if out.recipe == "probe":
            for p in model.parameters():
                p.requires_grad_(False)
            on_best(model, 0, None if not has_val else {"macro_recall": out.probe["val_macro_recall"]})
            return out
    weights_ce = class_weights(y["train"], n_classes) if P["class_weights"] else torch.ones(n_classes)
    weights_ce[torch.from_numpy(counts == 0)] = 0.0
    criterion = nn.CrossEntropyLoss(weight=weights_ce.to(device), label_smoothing=P["label_smoothing"]) \
        if targets is None else SoftTargetLoss(weights_ce.to(device), P["label_smoothing"])
    if top is not None:  # the top blocks learn from cached activations; the checkpoint is the whole network
        fitted, frozen, best = top, [], (lambda m, epoch, val: on_best(m.net, epoch, val))
        train_set = ViewDataset(acts["train"], y["train"], targets)
        val_set = ViewDataset(acts["val"], y["val"]) if has_val else None
    else:
        fitted, best = model, on_best
        frozen = freeze(model, P["freeze_blocks"]) if P["freeze_blocks"] > 0 else []
        train_set = GrayDataset(gray["train"], y["train"], augmentation(P), targets=targets)
        val_set = GrayDataset(gray["val"], y["val"]) if has_val else None
    if dist is None:
        train_loader = make_loader(train_set, batch_size=P["batch_size"], train=True, generator=generator,
                                   balanced=P["weighted_sampler"], device=device)
        val_loader = make_loader(val_set, batch_size=64, train=False, generator=generator,
                                 device=device) if has_val else None
    else:
        train_loader, val_loader = _distributed_loaders(P, train_set, val_set, dist, device)
    out.fit = fit(fitted, train_loader, val_loader, n_classes=n_classes, epochs=P["epochs"], lr=P["lr"],
                  weight_decay=P["weight_decay"], warmup_epochs=P["warmup_epochs"], patience=P["patience"],
                  device=device, criterion=criterion, on_best=best, progress=progress,
                  body_lr_mult=P["body_lr_mult"] if out.recipe in ("lpft", "partial") else 1.0, frozen=frozen,
                  ema_decay=P["ema_decay"], resume=resume, resume_key=resume_key, after_epoch=after_epoch,
                  dist=dist, precision=precision_for(device, P.get("precision", "auto")), mixup=P["mixup"])
    out.model = out.fit.last.net if top is not None else out.fit.last
    return out


def _distributed_loaders(P: dict, train_set, val_set, dist, device):
    """This rank's loaders: batch_size / world images of each global batch, a shard of validation."""
    from torch.utils.data import DataLoader

    from lib import distributed
    from lib.engine import loader_workers

    if P["batch_size"] % dist.world:
        raise ValueError(f"batch_size ({P['batch_size']}) must be a multiple of nproc_per_node ({dist.world}): "
                         f"each process takes an equal share of every batch")
    if P["weighted_sampler"]:
        raise ValueError("weighted_sampler is not available with nproc_per_node > 1 (use class_weights)")
    per_rank = P["batch_size"] // dist.world  # a last, partial batch is dropped, as with one process
    if len(train_set) < P["batch_size"]:
        raise ValueError(f"the training split holds {len(train_set)} images, fewer than one batch (batch_size "
                         f"{P['batch_size']}): too few for nproc_per_node {dist.world}")
    train = DataLoader(train_set, batch_size=per_rank, drop_last=len(train_set) // dist.world > per_rank,
                       sampler=distributed.sampler(train_set, dist), **loader_workers(device))
    val = DataLoader(distributed.shard(val_set, dist), batch_size=64,
                     **loader_workers(device)) if val_set is not None else None
    return train, val


@torch.inference_mode()
def _top_features(top: nn.Module, acts, device, batch_size: int = 64, rows: np.ndarray | None = None) -> np.ndarray:
    """Pooled features of the cached trunk activations' view 0 (the images themselves; or of those
    `rows`) through the top blocks (in eval mode), read a batch at a time."""
    top.eval().to(device)
    take = (lambda i, j: acts[i:j, 0]) if rows is None else (lambda i, j: acts[rows[i:j], 0])
    return batched(lambda i, j: top.pool(torch.from_numpy(take(i, j).astype(np.float32)).to(device)).float().cpu()
                   .numpy(), len(acts) if rows is None else len(rows), batch_size)


@torch.no_grad()
def adapt_batchnorm(top: nn.Module, acts, device, batch_size: int = 64) -> None:
    """Re-estimate the BatchNorm running statistics of the top blocks (`lib.model.Top`) on cached trunk
    activations [N, V, C, H, W], every view: a cumulative average over one pass in train mode, weights
    untouched. ImageNet's statistics normalise SEM features differently from the batch statistics
    training uses, so a probe fit on them meets other features in the first step (a loss of 14 in the
    first epoch of the default run, against 1.4 after re-estimation)."""
    norms = [m for m in top.features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    top.train().to(device)
    for v in range(acts.shape[1]):
        for i in range(0, acts.shape[0], batch_size):
            top.pool(torch.from_numpy(acts[i : i + batch_size, v].astype(np.float32)).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    top.eval()


PROBE_MAX_IMAGES = 10_000  # the linear probe is fit on at most this many training images


def probe_rows(y: np.ndarray, limit: int, seed: int) -> np.ndarray | None:
    """The training rows the probe is fit on: all of them (None) up to `limit`, else a class-stratified
    sample of `limit` (sorted), so that its features (5 KB an image) and the solver's memory stay
    bounded whatever the number of images."""
    if len(y) <= limit:
        return None
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(np.arange(len(y)), train_size=limit, stratify=y, random_state=seed)
    except ValueError:  # a class with a single image cannot be stratified: a plain random sample
        keep = np.random.default_rng(seed).choice(len(y), size=limit, replace=False)
    return np.sort(keep)


def describe_weights(prepared: Trained, P: dict, device) -> str:
    """The training report's first lines (Markdown): the weights used, the recipe that will run, the device."""
    from lib import model as net

    w = prepared.weights
    lines = [f"### Weights used: `{w['source']}`", w["detail"]]
    if w["source"] == "none" and P["weights"] != "none":
        lines.insert(0, f"**No pretrained weights for `{P['arch']}` were available: this model trains from random "
                        f"initialisation.** Offline alternative: {net.OFFLINE_ALTERNATIVE}.")
    lines += prepared.notes
    lines.append(f"Architecture `{P['arch']}` (width {P['width']}), {net.count_parameters(prepared.model):,} "
                 f"parameters; recipe **`{prepared.recipe}`**. Device: `{device}`, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} CPU threads.")
    return "\n\n".join(lines)


def data_table(y: dict, labels: list[str], P: dict):
    """Training and validation images per class, and each class's weight in the loss."""
    import pandas as pd

    n = len(labels)
    weights = class_weights(y["train"], n) if P["class_weights"] else torch.ones(n)
    return pd.DataFrame({"train images": np.bincount(y["train"], minlength=n),
                         "val images": np.bincount(y["val"], minlength=n),
                         "loss weight": weights.numpy().round(3)}, index=labels)


def train_and_checkpoint(P: dict, parts: dict, labels: list[str], prepared: Trained, checkpoint, *, device,
                         generator, build_dir, resume=None, resume_key: str = "") -> tuple[Trained, float]:
    """Train by the recipe on the decoded train / val parts (`lib.data.Part`), writing every new best
    model to `checkpoint` with its class list, parameters, weights source and recipe. Returns
    (the trained result, wall seconds). With `resume`, a killed training rerun with the same
    `resume_key` continues from its last epoch (see `lib.engine.fit`)."""
    import time

    check_processes(P, device)
    if P.get("nproc_per_node", 1) > 1:
        return _launch(P, labels, prepared, checkpoint, device=device, build_dir=build_dir, resume=resume,
                       resume_key=resume_key)
    started = time.perf_counter()
    trained = train_recipe(P, {s: parts[s].gray for s in parts}, {s: parts[s].y for s in parts}, len(labels),
                           device=device, generator=generator,
                           on_best=checkpoint_writer(P, labels, prepared, checkpoint), build_dir=build_dir,
                           scratch_dir=Path(build_dir) / "scratch", prepared=prepared, resume=resume,
                           resume_key=resume_key, groups=part_groups(parts["train"]))
    return trained, time.perf_counter() - started


def part_groups(part) -> np.ndarray | None:
    """The duplicate groups of a decoded part's images (the split's `group` column), when it has them."""
    return part.rows["group"].to_numpy() if "group" in part.rows else None


def check_processes(P: dict, device) -> None:
    """nproc_per_node, distill and distill_temperature within their schema ranges, and nproc_per_node and
    sync_bn against the device, before any process starts (errors name the key)."""
    params.check_keys(P, ("distill", "distill_temperature", "nproc_per_node"))
    n, cuda = P.get("nproc_per_node", 1), str(device).startswith("cuda")
    if cuda and n > torch.cuda.device_count():
        raise ValueError(f"parameter 'nproc_per_node' is {n}, but this machine has {torch.cuda.device_count()} "
                         f"CUDA devices (one process per GPU)")
    if P.get("sync_bn") and n > 1 and not cuda:
        raise ValueError("parameter 'sync_bn' needs CUDA (SyncBatchNorm has no CPU kernel); set sync_bn: false on "
                         "CPU, where each process keeps its own BatchNorm statistics")


def checkpoint_writer(P: dict, labels: list[str], prepared: Trained, checkpoint):
    """The `on_best` that writes each new best model with its class list, parameters, weights and recipe."""
    from lib import model as net

    def save_best(m, epoch, val):
        val = val or {}
        net.save_checkpoint(checkpoint, m, classes=labels, params=P, weights=prepared.weights,
                            recipe=prepared.recipe, epoch=epoch, val_macro_recall=val.get("macro_recall"),
                            val_loss=val.get("loss"))

    return save_best


def _launch(P: dict, labels: list[str], prepared: Trained, checkpoint, *, device, build_dir, resume,
            resume_key) -> tuple[Trained, float]:
    """Training under torchrun (`lib.distributed.run`), read back as one process's result: the best
    checkpoint rank 0 wrote, its history and probe."""
    from lib import distributed, model as net

    res = distributed.run(P, build_dir, Path(checkpoint).parent, resume=resume, resume_key=resume_key)
    model, _ = net.load_checkpoint(checkpoint, device)
    out = Trained(model=model, weights=res["weights"], recipe=res["recipe"], probe=res["probe"], notes=res["notes"])
    if res["fit"] is not None:
        out.fit = FitResult(**res["fit"], last=model)
    out.notes.append(f"Trained by {res['world']} processes under torchrun (DistributedDataParallel); the model "
                     f"shown is the best checkpoint rank 0 wrote.")
    return out, res["seconds"]


def resume_key(P: dict, build_dir) -> str:
    """What a saved training state must match to be resumed: the stage's parameters, the split, the
    training code (lib/engine, recipes, model, presets, distributed, cache, preprocess) and a local weights file."""
    import hashlib

    from lib import io

    here = Path(__file__).resolve().parent
    parts = [io.dumps(P), io.file_digest(Path(build_dir) / "split" / "split.csv")]
    parts += [io.file_digest(here / f"{m}.py") for m in ("engine", "recipes", "model", "presets", "distributed", "cache",
                                                          "preprocess")]
    if Path(str(P["weights"])).is_file():
        parts.append(io.file_digest(P["weights"]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def history(trained: Trained, seconds: float):
    """The run's history, one row per epoch (one row, epoch 0, for a probe)."""
    import pandas as pd

    return probe_history(trained.probe, seconds) if trained.fit is None else pd.DataFrame(trained.fit.history)


def describe_result(trained: Trained, seconds: float) -> str:
    """The probe floor, what training made of it and the run's notes (Markdown)."""
    floor, result = trained.probe, trained.fit
    if floor is not None:
        lines = [f"### Linear-probe floor\nLogistic regression on the frozen pretrained features: validation macro "
                 f"recall **{floor['val_macro_recall']:.3f}** (accuracy {floor['val_accuracy']:.3f}). A fine-tuned "
                 f"model must beat this to be worth its training."]
    else:
        lines = ["### Linear-probe floor\nNot computed: the weights are random (or there is no validation split), so "
                 "there is no floor to compare with."]
    if result is None:
        lines.append(f"Recipe `probe`: the checkpoint is the frozen body with the logistic-regression head "
                     f"({seconds:.0f} s, features and fit). No epochs, so no training curves.")
    else:
        epochs = len(result.history)
        verdict = ""
        if floor is not None:
            gain = result.best_val_macro_recall - floor["val_macro_recall"]
            verdict = f" Fine-tuning {'beats' if gain > 0 else 'does not beat'} the probe floor by {gain:+.3f}."
        lines.append(f"Best epoch **{result.best_epoch}** of {epochs} (validation macro recall "
                     f"{result.best_val_macro_recall:.3f}); {'stopped early' if result.stopped_early else 'ran all epochs'}; "
                     f"{result.seconds:.0f} s ({result.seconds / epochs:.1f} s per epoch).{verdict}")
        lines.append(f"Training loop: precision **{result.precision}**, **{result.images_per_second:,.0f} images/s** "
                     f"(forward, backward and step; validation excluded).")
    lines += [f"- {note}" for note in trained.notes]
    return "\n\n".join(lines)


def summary(trained: Trained, P: dict, labels: list[str], y: dict, device, seconds: float, hist) -> dict:
    """The record of `train/summary.json`."""
    from lib import model as net

    result, floor = trained.fit, trained.probe
    return {"weights": trained.weights, "arch": P["arch"], "width": P["width"], "recipe": trained.recipe,
            "notes": trained.notes, "probe_floor": floor, "device": str(device),
            "best_epoch": 0 if result is None else result.best_epoch,
            "best_val_macro_recall": (floor or {}).get("val_macro_recall") if result is None else result.best_val_macro_recall,
            "epochs_run": 0 if result is None else len(hist),
            "stopped_early": False if result is None else result.stopped_early, "seconds": seconds,
            "precision": None if result is None else result.precision,
            "images_per_second": None if result is None else result.images_per_second,
            "processes": P.get("nproc_per_node", 1),
            "first_train_loss": hist["train_loss"].astype(float).iloc[0],
            "last_train_loss": hist["train_loss"].astype(float).iloc[-1], "classes": labels,
            "train_images": int(len(y["train"])), "val_images": int(len(y["val"])),
            "parameters": net.count_parameters(trained.model)}
