"""Training engine: augmentation preset, class weights, one epoch, evaluation, the fit loop.

Images are decoded once (`lib.data.cache_gray`) and kept as grayscale tensors; the train
preset augments them, `lib.data.normalize` turns them into network input.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from lib.data import normalize
from lib.metrics import macro_recall


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class _AddNoise(nn.Module):
    """Gaussian noise with a random std in [0, max_std] per image (detector noise varies by tool)."""

    def __init__(self, max_std: float):
        super().__init__()
        self.max_std = max_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.rand(()) * self.max_std
        return (x + torch.randn_like(x) * std).clamp(0, 1)


class _Resolution(nn.Module):
    """Down-sample to a random fraction in [min_fraction, 1] of the side, then back up (p = 0.5):
    a coarser pixel size or an image that was stored small and enlarged."""

    def __init__(self, min_fraction: float):
        super().__init__()
        self.min_fraction = min_fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            return x
        side = x.shape[-1]
        f = self.min_fraction + (1 - self.min_fraction) * float(torch.rand(()))
        small = nn.functional.interpolate(x[None], size=max(8, round(side * f)), mode="bilinear", antialias=True)
        return nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear")[0].clamp(0, 1)


class _Gamma(nn.Module):
    """Gamma in [exp(-max_log), exp(max_log)]: detector response and brightness curves differ by tool."""

    def __init__(self, max_log: float):
        super().__init__()
        self.max_log = max_log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = math.exp((2 * float(torch.rand(())) - 1) * self.max_log)
        return x.clamp(1e-6, 1) ** gamma


class _Jpeg(nn.Module):
    """JPEG re-compression at a random quality in [min_quality, 95] (p = 0.5)."""

    def __init__(self, min_quality: int):
        super().__init__()
        self.min_quality = min_quality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            return x
        from lib.shifts import jpeg

        quality = int(torch.randint(self.min_quality, 96, ()))
        return torch.from_numpy(jpeg(x[0].numpy(), quality))[None]


def train_transform(*, size: int, shift: float = 0.0, scale: float = 0.0, brightness: float = 0.0,
                    contrast: float = 0.0, noise: float = 0.0, blur: float = 0.0, flip: bool = False,
                    resolution: float = 0.0, gamma: float = 0.0, jpeg: int = 0) -> v2.Compose:
    """Augmentation for grayscale [1, H, W] tensors on 0-1 that keeps SEM semantics.

    No rotations or flips unless asked: scan direction and shading are not symmetric.
    Each argument at 0 (or False) switches its step off. `resolution`, `gamma` and `jpeg`
    cover the shifts of `lib.shifts` (down-up sampling, gamma, JPEG); noise, contrast and
    blur cover the rest.
    """
    steps: list[nn.Module] = []
    if flip:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if scale > 0:
        # zoom in by up to `scale` of the side: SEM tools and recipes differ in pixel size
        area = (1 - scale) ** 2
        steps.append(v2.RandomResizedCrop(size, scale=(area, 1.0), ratio=(0.9, 1.1), antialias=True))
    if shift > 0:
        # shift by cropping a reflect-padded image: no black borders for the model to learn
        steps.append(v2.RandomCrop(size, padding=max(1, round(shift * size)), padding_mode="reflect"))
    if resolution > 0:
        steps.append(_Resolution(resolution))
    if brightness > 0 or contrast > 0:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    if gamma > 0:
        steps.append(_Gamma(gamma))
    if blur > 0:
        k = 2 * math.ceil(3 * blur) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=(0.1, blur))], p=0.5))
    if noise > 0:
        steps.append(_AddNoise(noise))
    if jpeg > 0:
        steps.append(_Jpeg(jpeg))
    steps.append(v2.Resize((size, size), antialias=True))  # no-op at the cached size
    return v2.Compose(steps)


class GrayDataset(Dataset):
    """Cached grayscale images + integer labels; returns (normalised input, label)."""

    def __init__(self, gray: np.ndarray, labels: np.ndarray, transform=None):
        self.gray = torch.from_numpy(np.ascontiguousarray(gray))
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.gray[i]
        if self.transform is not None:
            x = self.transform(x)
        return normalize(x.float()), self.labels[i]


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over classes present (sklearn's 'balanced' rule)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def make_loader(ds: Dataset, *, batch_size: int, train: bool, generator: torch.Generator,
                balanced: bool = False) -> DataLoader:
    sampler = None
    if train and balanced:
        labels = ds.labels.numpy()
        w = 1.0 / np.bincount(labels)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=len(labels), replacement=True,
                                        generator=generator)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, drop_last=train and len(ds) > batch_size, num_workers=0)


def warmup_cosine(optimizer, *, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_mode(model: nn.Module, frozen=()) -> None:
    """model.train(), except frozen blocks, which stay in eval mode (their BatchNorm statistics too)."""
    model.train()
    for block in frozen:
        block.eval()


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, progress=None, frozen=(),
                    ema=None) -> dict:
    train_mode(model, frozen)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        if progress is not None:
            progress.update(len(y))
            progress.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.inference_mode()
def predict(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) over a loader, in order."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device, memory_format=torch.channels_last)).float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model, loader, criterion, device, n_classes: int) -> dict:
    logits, labels = predict(model, loader, device)
    loss = criterion(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    pred = logits.argmax(1)
    return {"loss": loss, "accuracy": float((pred == labels).mean()),
            "macro_recall": macro_recall(labels, pred, n_classes)}


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_macro_recall: float = -1.0
    stopped_early: bool = False
    seconds: float = 0.0
    last: nn.Module | None = None  # the model after the last epoch (the EMA when ema_decay > 0)


def fit(model, train_loader, val_loader, *, n_classes: int, epochs: int, lr: float, weight_decay: float,
        warmup_epochs: float, patience: int, device, criterion, on_best, progress: bool = True,
        body_lr_mult: float = 1.0, frozen=(), ema_decay: float = 0.0) -> FitResult:
    """AdamW + warm-up/cosine; early stopping on validation macro recall.

    `on_best(model, epoch, val_metrics)` is called whenever validation macro recall improves
    (ties broken by lower validation loss), e.g. to write the checkpoint. Without a
    validation loader every epoch runs and `on_best` gets the last model (val_metrics None).

    Fine-tuning controls: the body (`model.features`) learns at `lr * body_lr_mult` and the
    head at `lr`; `frozen` blocks (see `freeze`) get no updates and keep BatchNorm in eval
    mode; `ema_decay` > 0 keeps an exponential moving average of the weights (and BatchNorm
    buffers), which is what gets evaluated and handed to `on_best`.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    # channels-last is about twice as fast for depthwise convolutions on CPU
    model.to(memory_format=torch.channels_last)
    head = [p for p in model.classifier.parameters() if p.requires_grad]
    body = [p for p in model.features.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": lr}] + ([{"params": body, "lr": lr * body_lr_mult}] if body else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    steps = epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, warmup_steps=max(1, int(warmup_epochs * len(train_loader))),
                              total_steps=steps)
    ema = None
    if ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    scored = (lambda: ema.module) if ema is not None else (lambda: model)
    eval_criterion = nn.CrossEntropyLoss(weight=getattr(criterion, "weight", None))
    result = FitResult()
    best_key = (-1.0, 0.0)
    since_best = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm  # plain text: reports render it without widgets

        bar = tqdm(total=epochs, desc="epochs", unit="epoch")
    for epoch in range(1, epochs + 1):
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device, frozen=frozen, ema=ema)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"]}
        if val_loader is not None:
            va = evaluate(scored(), val_loader, eval_criterion, device, n_classes)
            row |= {"val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_macro_recall": va["macro_recall"]}
        row |= {"lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        result.history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_loss=f"{tr['loss']:.3f}",
                            **({"val_recall": f"{va['macro_recall']:.3f}"} if val_loader is not None else {}))
        if val_loader is None:
            continue
        key = (va["macro_recall"], -va["loss"])
        if key > best_key:
            best_key, since_best = key, 0
            result.best_epoch, result.best_val_macro_recall = epoch, va["macro_recall"]
            on_best(scored(), epoch, va)
        else:
            since_best += 1
        if since_best >= patience:
            result.stopped_early = True
            break
    if val_loader is None:
        result.best_epoch = len(result.history)
        on_best(scored(), result.best_epoch, None)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.last = scored()
    return result


# --- Linear probe, then fine-tuning (LP-FT) ---------------------------------------------


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
def pooled_features(model: nn.Module, gray: np.ndarray, device="cpu", batch_size: int = 64) -> np.ndarray:
    """Pooled body features [N, F] of cached grayscale images [N, 1, H, W], body in eval mode."""
    was_training = model.training
    model.eval().to(device)
    out = []
    for i in range(0, len(gray), batch_size):
        x = normalize(torch.from_numpy(np.ascontiguousarray(gray[i : i + batch_size])).float().to(device))
        out.append(model.pool(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


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


def read_curves(history: "pd.DataFrame", *, test_accuracy: float | None = None,
                best_val_macro_recall: float | None = None) -> list[str]:
    """The training curves read for over- or under-fitting, as sentences (Markdown).

    A probe (or any history without validation losses) has no curves to read, and says so."""
    import pandas as pd

    losses = history[["train_loss", "val_loss"]].apply(pd.to_numeric, errors="coerce").dropna()
    notes = []
    if losses.empty:
        notes.append("No training curves to read: the model was not trained by gradient descent (recipe `probe`: a "
                     "logistic regression on frozen features), or without a validation split.")
    else:
        h = history.loc[losses.index]
        best, last = h.loc[h["val_loss"].astype(float).idxmin()], h.iloc[-1]
        notes.append(f"Validation loss was lowest at epoch {int(best['epoch'])} ({best['val_loss']:.3f}); at the last "
                     f"epoch ({int(last['epoch'])}) train loss {last['train_loss']:.3f}, validation loss "
                     f"{last['val_loss']:.3f}.")
        if last["val_loss"] > 1.5 * best["val_loss"] and last["train_loss"] < best["train_loss"]:
            notes.append("Validation loss rose while training loss kept falling: **over-fitting** after the best "
                         "epoch; the checkpoint from the best epoch is the one evaluated.")
        elif last["train_accuracy"] < 0.9 and last["val_accuracy"] < 0.9:
            notes.append("Both training and validation accuracy stay below 0.90: **under-fitting**; more epochs, "
                         "a larger input or pretrained weights would help.")
        else:
            notes.append("Training and validation curves track each other: no strong sign of over- or under-fitting.")
    if test_accuracy is not None and best_val_macro_recall is not None:
        notes.append(f"Test accuracy {test_accuracy:.3f} against best validation macro recall "
                     f"{best_val_macro_recall:.3f}.")
    return notes


# --- One entry point for every recipe: the training notebook and cross-validation share it ---

RECIPES = ("ft", "lpft", "probe")


@dataclass
class Trained:
    model: nn.Module  # after the last epoch (the EMA when used); on_best received the best one
    weights: dict
    recipe: str  # the recipe that ran (probe and lpft become ft without pretrained weights)
    probe: dict | None = None  # the linear probe's validation metrics: the floor to beat
    fit: FitResult | None = None
    notes: list[str] = field(default_factory=list)


def augmentation(P: dict) -> v2.Compose:
    """The training augmentation the parameters ask for (aug_* keys)."""
    return train_transform(size=P["image_size"], shift=P["aug_shift"], scale=P["aug_scale"],
                           brightness=P["aug_brightness"], contrast=P["aug_contrast"], noise=P["aug_noise"],
                           blur=P["aug_blur"], flip=P["aug_flip"], resolution=P["aug_resolution"],
                           gamma=P["aug_gamma"], jpeg=P["aug_jpeg"])


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


def train_recipe(P: dict, gray: dict, y: dict, n_classes: int, *, device, generator, on_best=None,
                 progress: bool = True, build_dir="build", prepared: Trained | None = None,
                 features: dict | None = None) -> Trained:
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
    """
    from lib.metrics import macro_recall

    out = prepared or prepare(P, n_classes, build_dir=build_dir)
    model = out.model.to(device)
    has_val = "val" in gray and len(gray["val"]) > 0
    on_best = on_best or (lambda *a: None)
    counts = np.bincount(y["train"], minlength=n_classes)
    if out.recipe in ("probe", "lpft"):
        features = features or {}
        feats = features["train"] if "train" in features else pooled_features(model, gray["train"], device)
        w, b, clf = linear_probe(feats, y["train"], n_classes, balanced=P["class_weights"], c=P["probe_c"],
                                 seed=P["seed"])
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
    criterion = nn.CrossEntropyLoss(weight=weights_ce.to(device), label_smoothing=P["label_smoothing"])
    frozen = freeze(model, P["freeze_blocks"]) if P["freeze_blocks"] > 0 else []
    train_loader = make_loader(GrayDataset(gray["train"], y["train"], augmentation(P)), batch_size=P["batch_size"],
                               train=True, generator=generator, balanced=P["weighted_sampler"])
    val_loader = (make_loader(GrayDataset(gray["val"], y["val"]), batch_size=64, train=False, generator=generator)
                  if has_val else None)
    out.fit = fit(model, train_loader, val_loader, n_classes=n_classes, epochs=P["epochs"], lr=P["lr"],
                  weight_decay=P["weight_decay"], warmup_epochs=P["warmup_epochs"], patience=P["patience"],
                  device=device, criterion=criterion, on_best=on_best, progress=progress,
                  body_lr_mult=P["body_lr_mult"] if out.recipe == "lpft" else 1.0, frozen=frozen,
                  ema_decay=P["ema_decay"])
    out.model = out.fit.last
    return out
