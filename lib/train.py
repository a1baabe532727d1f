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


def train_transform(*, size: int, shift: float = 0.0, scale: float = 0.0, brightness: float = 0.0,
                    contrast: float = 0.0, noise: float = 0.0, blur: float = 0.0, flip: bool = False) -> v2.Compose:
    """Augmentation for grayscale [1, H, W] tensors on 0-1 that keeps SEM semantics.

    No rotations or flips unless asked: scan direction and shading are not symmetric.
    Each argument at 0 (or False) switches its step off.
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
    if brightness > 0 or contrast > 0:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    if blur > 0:
        k = 2 * math.ceil(3 * blur) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=(0.1, blur))], p=0.5))
    if noise > 0:
        steps.append(_AddNoise(noise))
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


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, progress=None) -> dict:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
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


def fit(model, train_loader, val_loader, *, n_classes: int, epochs: int, lr: float, weight_decay: float,
        warmup_epochs: float, patience: int, device, criterion, on_best, progress: bool = True) -> FitResult:
    """AdamW + warm-up/cosine; early stopping on validation macro recall.

    `on_best(model, epoch, val_metrics)` is called whenever validation macro recall improves
    (ties broken by lower validation loss), e.g. to write the checkpoint.
    """
    # channels-last is about twice as fast for MobileNetV2's depthwise convolutions on CPU
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, warmup_steps=max(1, int(warmup_epochs * len(train_loader))),
                              total_steps=steps)
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
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device)
        va = evaluate(model, val_loader, eval_criterion, device, n_classes)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_macro_recall": va["macro_recall"],
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        result.history.append(row)
        key = (va["macro_recall"], -va["loss"])
        if key > best_key:
            best_key, since_best = key, 0
            result.best_epoch, result.best_val_macro_recall = epoch, va["macro_recall"]
            on_best(model, epoch, va)
        else:
            since_best += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_loss=f"{tr['loss']:.3f}", val_recall=f"{va['macro_recall']:.3f}")
        if since_best >= patience:
            result.stopped_early = True
            break
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result
