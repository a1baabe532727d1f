"""Engine: the plain train / evaluate functions every recipe uses.

Seeding and determinism, the dataset of cached grayscale images, class weights, loaders, the
warm-up + cosine schedule, `train_one_epoch`, `evaluate` (under `torch.inference_mode`),
`fit` (AdamW, early stopping on validation macro recall, optional EMA), logits of a model on
an input array, and the reading of a training history for over- or under-fitting.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from lib.metrics import macro_recall
from lib.preprocess import normalize

PROGRESS_SECONDS = 15.0  # the epoch bar's shortest interval between refreshes


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic  # CUDA: autotuned kernels, unless runs must repeat
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class GrayDataset(Dataset):
    """Cached grayscale images (in memory, or a `lib.cache.DiskArray` read one image at a time) +
    integer labels; returns (normalised input, label), or (normalised input, target) with `targets`
    [N, C] (class probabilities to train towards, `SoftTargetLoss`)."""

    def __init__(self, gray, labels: np.ndarray, transform=None, targets: np.ndarray | None = None):
        self.gray = gray
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform
        self.targets = None if targets is None else torch.tensor(np.asarray(targets), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.gray[i], dtype=np.float32))
        if self.transform is not None:
            x = self.transform(x)
        return normalize(x.float()), self.labels[i] if self.targets is None else self.targets[i]


class SoftTargetLoss(nn.Module):
    """Cross-entropy that takes either class indices [B] (exactly nn.CrossEntropyLoss with the same
    weight and label_smoothing) or class probabilities [B, C]: sum_c w_c t_c (-log p_c) over the
    batch, with t the target smoothed alike, divided by sum_c w_c t_c before smoothing, which for a
    one-hot target is the class-index form's weighted mean."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)
        w = self.weight.to(logits.device)
        smoothed = target * (1.0 - self.label_smoothing) + self.label_smoothing / logits.shape[1]
        loss = -(smoothed * w * F.log_softmax(logits, dim=1)).sum()
        return loss / (target * w).sum().clamp_min(1e-12)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over classes present (sklearn's 'balanced' rule)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def precision_for(device, name: str = "auto") -> str:
    """The training precision: fp32 on CPU (no VNNI / AMX here, so bf16 buys little); on CUDA, bf16
    where the GPU supports it, else fp16 (with a gradient scaler)."""
    if name != "auto":
        return name
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device, precision: str):
    """The autocast context of a precision (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def loader_workers(device) -> dict:
    """DataLoader settings: on CUDA, worker processes and pinned memory keep the GPU fed; on CPU the
    main process decodes nothing (images are cached arrays), so workers would only compete for cores."""
    if str(device).startswith("cuda"):
        import os

        # not persistent: each epoch's workers take their seeds from the loader's generator, which a
        # resumed run restores, so augmentation after a resume is what it would have been
        return {"num_workers": min(4, os.cpu_count() or 1), "pin_memory": True}
    return {"num_workers": 0}


def make_loader(ds: Dataset, *, batch_size: int, train: bool, generator: torch.Generator,
                balanced: bool = False, device="cpu") -> DataLoader:
    sampler = None
    if train and balanced:
        labels = ds.labels.numpy()
        w = 1.0 / np.bincount(labels)[labels]
        sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=len(labels), replacement=True,
                                        generator=generator)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, drop_last=train and len(ds) > batch_size, **loader_workers(device))


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
                    ema=None, precision: str = "fp32", scaler=None, mixup: float = 0.0) -> dict:
    """One pass over the loader; `precision` bf16 / fp16 runs the forward pass under autocast (fp16
    with `scaler`, a torch.amp.GradScaler). `mixup` > 0 blends each batch with a shuffled copy of
    itself at a weight drawn from Beta(mixup, mixup), folded to at least 0.5, and mixes the loss alike
    (Zhang et al. 2018; on cached activations this is manifold mixup); accuracy counts the larger
    share's label. Returns mean loss and accuracy, their sums, the images seen and the seconds taken."""
    train_mode(model, frozen)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    for x, y in loader:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if mixup > 0:
            lam = float(torch.distributions.Beta(mixup, mixup).sample())
            lam, perm = max(lam, 1.0 - lam), torch.randperm(len(y), device=y.device)
            x = lam * x + (1.0 - lam) * x[perm]
        with autocast(device, precision):
            logits = model(x)
        loss = criterion(logits.float(), y)
        if mixup > 0:
            loss = lam * loss + (1.0 - lam) * criterion(logits.float(), y[perm])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == (y.argmax(1) if y.ndim > 1 else y)).sum().item()
        seen += len(y)
        if progress is not None:
            progress.update(len(y))
            progress.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen, "loss_sum": total_loss, "correct": correct,
            "seen": seen, "seconds": time.perf_counter() - started}


@torch.inference_mode()
def predict(model, loader, device, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) over a loader, in order."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast(device, precision):
            logits.append(model(x.to(device, memory_format=torch.channels_last)).float().cpu())
        labels.append(y)
    if not logits:  # an empty loader (a rank's shard of a tiny split)
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(model, loader, criterion, device, n_classes: int, dist=None, precision: str = "fp32") -> dict:
    """Loss, accuracy and macro recall over a loader; with `dist`, over every rank's shard together."""
    logits, labels = predict(model, loader, device, precision)
    if dist is not None:
        from lib.distributed import gather

        shards = [(a, b) for a, b in gather((logits, labels)) if len(b)]
        logits, labels = np.concatenate([a for a, _ in shards]), np.concatenate([b for _, b in shards])
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
    precision: str = "fp32"
    images_per_second: float = 0.0  # the training loop's throughput (all processes together)
    last: nn.Module | None = None  # the model after the last epoch (the EMA when ema_decay > 0)


def _rng_states(loader) -> dict:
    gen = getattr(loader, "generator", None)
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "loader": gen.get_state() if gen is not None else None}


def _set_rng_states(states: dict, loader) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if states["loader"] is not None and getattr(loader, "generator", None) is not None:
        loader.generator.set_state(states["loader"])


def fit(model, train_loader, val_loader, *, n_classes: int, epochs: int, lr: float, weight_decay: float,
        warmup_epochs: float, patience: int, device, criterion, on_best, progress: bool = True,
        body_lr_mult: float = 1.0, frozen=(), ema_decay: float = 0.0, resume=None, resume_key: str = "",
        after_epoch=None, dist=None, precision: str = "fp32", mixup: float = 0.0) -> FitResult:
    """AdamW + warm-up/cosine; early stopping on validation macro recall.

    `on_best(model, epoch, val_metrics)` is called whenever validation macro recall improves
    (ties broken by lower validation loss), e.g. to write the checkpoint. Without a
    validation loader every epoch runs and `on_best` gets the last model (val_metrics None).

    Fine-tuning controls: the body (`model.features`) learns at `lr * body_lr_mult` and the
    head at `lr`; `frozen` blocks (see `freeze`) get no updates and keep BatchNorm in eval
    mode; `ema_decay` > 0 keeps an exponential moving average of the weights (and BatchNorm
    buffers), which is what gets evaluated and handed to `on_best`; `mixup` > 0 trains on mixed
    batches (see `train_one_epoch`).

    Resume: with `resume` (a file path), the whole training state is written there atomically after
    every epoch: model, optimizer, scheduler, EMA, the Python / numpy / torch / loader RNG states,
    early-stopping state, history and the best model so far. When the file exists at the start and
    carries the same `resume_key` (the caller's fingerprint of parameters and data), training
    continues after its epoch, `on_best` is first handed the best model saved there, and the result
    matches an uninterrupted run. A file with another key is ignored (and overwritten). The caller
    removes it once its own artifacts are written. `after_epoch(epoch)` runs after each epoch's
    state is saved.

    Several processes (`dist`, a `lib.distributed.Dist` under torchrun): the model is wrapped in
    DistributedDataParallel, the loaders are this rank's share (`lib.distributed.sampler` / `shard`),
    training and validation figures are gathered over all ranks (so early stopping decides alike
    everywhere), and only rank 0 calls `on_best` and writes the resume state (with every rank's RNG
    states).

    `precision` ("fp32", "bf16", "fp16"; see `precision_for`): the forward passes run under autocast,
    fp16 with a gradient scaler. The result records it and the training loop's images per second.
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
    forward = model
    if dist is not None:
        from lib.distributed import wrap

        forward = wrap(model, dist, device)
    main = dist is None or dist.main
    rank = 0 if dist is None else dist.rank
    if dist is not None:
        from lib.distributed import gather

    def save_state(epoch: int) -> None:
        """The resume state after `epoch`; every rank takes part (its RNG states), rank 0 writes."""
        if resume is None:
            return
        rng = [_rng_states(train_loader)] if dist is None else gather(_rng_states(train_loader))
        if main:
            _write_state(resume, {
                "format": STATE_FORMAT, "key": resume_key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None, "best_key": best_key,
                "since_best": since_best, "best_state": best_state, "history": result.history,
                "best_epoch": result.best_epoch, "best_val_macro_recall": result.best_val_macro_recall,
                "seconds": time.perf_counter() - start, "rng": rng, "stopped": result.stopped_early,
                "loop": (loop_images, loop_seconds)})

    ema = None
    if ema_decay > 0:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    scored = (lambda: ema.module) if ema is not None else (lambda: model)
    weight = getattr(criterion, "weight", None)  # the validation loss is computed on CPU logits
    eval_criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.detach().cpu())
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
    result = FitResult(precision=precision)
    loop_images, loop_seconds = 0, 0.0
    best_key = (-1.0, 0.0)
    since_best = 0
    start = time.perf_counter()
    bar = None
    first, best_state = 1, None
    state = _read_state(resume, resume_key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        best_key, since_best, best_state = tuple(state["best_key"]), state["since_best"], state["best_state"]
        result.history, result.best_epoch = state["history"], state["best_epoch"]
        result.best_val_macro_recall = state["best_val_macro_recall"]
        start -= state["seconds"]
        loop_images, loop_seconds = state["loop"]
        result.images_per_second = loop_images / max(loop_seconds, 1e-9)
        result.stopped_early = state["stopped"]
        first = epochs + 1 if state["stopped"] else state["epoch"] + 1  # early stopping had ended it
        _set_rng_states(state["rng"][rank], train_loader)
        if best_state is not None and main:
            import copy

            best = copy.deepcopy(scored())
            best.load_state_dict(best_state["model"])
            on_best(best, result.best_epoch, best_state["val"])
    if progress and main:
        from tqdm import tqdm  # plain text: reports render it without widgets

        # at most one line per PROGRESS_SECONDS: a rendered report keeps every refresh as a line of its own
        # (miniters=1 also keeps tqdm's monitor thread from forcing a refresh after 10 s without one)
        bar = tqdm(total=epochs, initial=first - 1, desc="epochs", unit="epoch", mininterval=PROGRESS_SECONDS,
                   miniters=1)
    for epoch in range(first, epochs + 1):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)  # DistributedSampler: this epoch's permutation
        tr = train_one_epoch(forward, train_loader, criterion, optimizer, scheduler, device, frozen=frozen, ema=ema,
                             precision=precision, scaler=scaler, mixup=mixup)
        if dist is not None:
            every = gather(tr)
            sums = [sum(t[k] for t in every) for k in ("loss_sum", "correct", "seen")]
            tr = {"loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2], "seen": sums[2],
                  "seconds": max(t["seconds"] for t in every)}
        loop_images, loop_seconds = loop_images + tr["seen"], loop_seconds + tr["seconds"]
        result.images_per_second = loop_images / max(loop_seconds, 1e-9)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"]}
        if val_loader is not None:
            if dist is not None:  # every rank scores rank 0's model (BatchNorm statistics are per process)
                for buffer in scored().buffers():
                    torch.distributed.broadcast(buffer, 0)
            va = evaluate(scored(), val_loader, eval_criterion, device, n_classes, dist=dist, precision=precision)
            row |= {"val_loss": va["loss"], "val_accuracy": va["accuracy"], "val_macro_recall": va["macro_recall"]}
        row |= {"lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        result.history.append(row)
        if bar is not None:
            bar.set_postfix(train_loss=f"{tr['loss']:.3f}", refresh=False,
                            **({"val_recall": f"{va['macro_recall']:.3f}"} if val_loader is not None else {}))
            bar.update(1)
        if val_loader is None:
            save_state(epoch)
            if after_epoch is not None:
                after_epoch(epoch)
            continue
        key = (va["macro_recall"], -va["loss"])
        if key > best_key:
            best_key, since_best = key, 0
            result.best_epoch, result.best_val_macro_recall = epoch, va["macro_recall"]
            if main:
                on_best(scored(), epoch, va)
            if resume is not None and main:
                best_state = {"model": {k: v.detach().clone() for k, v in scored().state_dict().items()}, "val": va}
        else:
            since_best += 1
        result.stopped_early = since_best >= patience
        save_state(epoch)
        if after_epoch is not None:
            after_epoch(epoch)
        if result.stopped_early:
            break
    if val_loader is None:
        result.best_epoch = len(result.history)
        if main:
            on_best(scored(), result.best_epoch, None)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.last = scored()
    return result


STATE_FORMAT = 1  # the resume state's layout; a state of another layout is not resumed from


def _read_state(path, key: str) -> dict | None:
    """The training state `fit` saved at `path`, or None when there is none or it is another run's."""
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a state the project cannot read is started over, not fatal
        print(f"note: the training state {path} cannot be read ({type(e).__name__}: {e}); training starts over "
              f"and replaces it")
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("key") != key:
        return None
    return state


def _write_state(path, state: dict) -> None:
    from pathlib import Path

    from lib.io import atomic_path, make_parents

    make_parents(Path(path))
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@torch.inference_mode()
def batched(fn, n: int, batch_size: int) -> np.ndarray:
    """fn(i, j) (a numpy array of j - i rows) for consecutive batches of range(n), written into one
    array allocated once; [0, 0] when n is 0. (Keeping each batch's result until a final
    concatenate interleaves small long-lived blocks with the batches' large temporaries on the heap,
    which then cannot shrink: resident memory grew by about 130 KB per image.)"""
    out = None
    for i in range(0, n, batch_size):
        r = fn(i, min(n, i + batch_size))
        if out is None:
            out = np.empty((n, *r.shape[1:]), r.dtype)
        out[i : i + len(r)] = r
    return out if out is not None else np.zeros((0, 0), np.float32)


def logits(model: nn.Module, x: np.ndarray, batch_size: int = 8, device="cpu") -> np.ndarray:
    """Logits of a model for input x [N, 3, H, W] (numpy), in batches, on `device`. Small batches are
    the fast ones on a CPU: 180 images of EfficientNet-Lite0 at 160 px took 1.3 s in batches of 8,
    1.8-2.1 s in 16 and 3.8-4.1 s in 64 on 2 cores (the activations of a small batch stay in cache)."""
    model = model.eval().to(device)
    return batched(lambda i, j: model(torch.from_numpy(np.ascontiguousarray(x[i:j])).to(device)).float().cpu().numpy(),
                   len(x), batch_size)


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
