"""Group k-fold cross-validation of training configurations on one dataset.

Groups are the leakage audit's duplicate groups (bytes, pixels, name family, perceptual
hashes), so an original and its offline-augmented copies always sit in the same fold. Each
configuration trains through `lib.train.train_recipe` (the training notebook's code) on the
other folds' files, copies included, and is scored on the held-out fold with one image per
group: its original, not its augmented copies.

A configuration is one line of space-separated `key:value` overrides of the training
parameters, e.g. ``arch:efficientnet_lite0 weights:imagenet recipe:lpft epochs:10``; every key
and value is checked against the parameter schema.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from lib import leakage, params
from lib.metrics import defect_vs_clean, macro_recall


@dataclass
class Config:
    text: str
    overrides: dict
    P: dict


def parse_config(text: str, base: dict) -> Config:
    """`key:value key:value ...` -> the base parameters with those keys replaced (checked)."""
    overrides = {}
    for token in text.split():
        key, sep, raw = token.partition(":")
        if not sep or not key:
            raise params.ParamError(f"cv config {text!r}: {token!r} is not key:value")
        value = yaml.safe_load(raw) if raw else ""
        if key in params.SCHEMA and params.SCHEMA[key].type is str and not isinstance(value, str):
            value = raw  # a path or name that YAML read as a number
        overrides[key] = params.check(key, value, f"cv config {text!r}")
    return Config(text=text, overrides=overrides, P={**base, **overrides})


def audit_groups(df: pd.DataFrame, phash_threshold: int, dhash_threshold: int, workers: int = 2) -> pd.DataFrame:
    """Duplicate groups of the files in df (path, class) and which file represents each group.

    The leakage audit's detectors and groups (`lib.leakage.audit`), plus `representative`: per
    group, the file whose name carries no copy or augmentation suffix (the original).
    """
    out, _ = leakage.audit(df[["path", "class"]], phash_threshold, dhash_threshold, workers=workers)
    return out.assign(representative=leakage.representatives(out))


def folds(labels, groups, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: (train positions, test positions) per fold; a group never splits."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} duplicate groups, found {n_groups}")
    largest = int(np.unique(labels, return_counts=True)[1].max())
    if largest < k:
        raise ValueError(f"{k}-fold stratified cross-validation needs a class with at least {k} images; the largest "
                         f"has {largest}: lower cv_folds")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in sgkf.split(labels, labels, groups)]


def cache_key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


@dataclass
class ConfigResult:
    config: str
    weights: str
    recipe: str
    folds: pd.DataFrame  # one row per fold: macro recall, accuracy, miss rate, seconds
    per_class: pd.DataFrame  # fold x class recall
    confusion: np.ndarray  # summed over folds
    shifts: pd.DataFrame  # fold x shift macro recall
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_config(cfg: Config, gray: np.ndarray, y: np.ndarray, splits, representative: np.ndarray,
               classes: list[str], *, device, shift_names=(), build_dir="build", progress: bool = False,
               log=print, feature_cache: dict | None = None) -> ConfigResult:
    """Train and score one configuration on every fold.

    For probe and lpft the pooled features of every image under the initial (pretrained)
    weights are computed once and shared by all folds, and by every configuration with the
    same architecture, weights and input size through `feature_cache`.
    """
    from lib import export, shifts as shift_lib, train
    from lib.data import normalize

    n = len(classes)
    rows, per_class, shift_rows = [], [], []
    confusion = np.zeros((n, n), np.int64)
    notes: set[str] = set()
    weights, recipe = "", cfg.P["recipe"]
    start = time.perf_counter()
    for f, (tr, te) in enumerate(splits):
        t0 = time.perf_counter()
        generator = train.seed_everything(cfg.P["seed"] + f, cfg.P["deterministic"])
        prepared = train.prepare(cfg.P, n, build_dir=build_dir)
        feats = None
        if prepared.recipe in ("probe", "lpft"):
            key = (cfg.P["arch"], cfg.P["width"], prepared.weights["source"], prepared.weights.get("sha256"),
                   prepared.weights["detail"], cfg.P["image_size"], len(gray))
            cache = feature_cache if feature_cache is not None else {}
            if key not in cache:
                cache[key] = train.pooled_features(prepared.model, gray, device)
            feats = {"train": cache[key][tr]}
        trained = train.train_recipe(cfg.P, {"train": gray[tr]}, {"train": y[tr]}, n, device=device,
                                     generator=generator, progress=progress, build_dir=build_dir,
                                     prepared=prepared, features=feats)
        weights, recipe = trained.weights["source"], trained.recipe
        notes.update(trained.notes)
        if trained.weights["source"] == "none" and cfg.P["weights"] not in ("none",):
            notes.add(trained.weights["detail"])
        test = te[representative[te]]
        yt = y[test]
        pred = export.run_torch(trained.model, normalize(gray[test]), device=device).argmax(1)
        dvc = defect_vs_clean(yt, pred, classes)
        rows.append({"fold": f + 1, "train images": len(tr), "test groups": len(test),
                     "macro recall": macro_recall(yt, pred, n), "accuracy": float((pred == yt).mean()),
                     "miss rate": dvc["miss_rate"], "seconds": time.perf_counter() - t0})
        per_class.append([float((pred[yt == c] == c).mean()) if (yt == c).any() else np.nan for c in range(n)])
        np.add.at(confusion, (yt, pred), 1)
        if shift_names:
            srow = {"fold": f + 1}
            for name in shift_names:
                shifted = shift_lib.apply(name, gray[test], seed=f)
                sp = export.run_torch(trained.model, normalize(shifted), device=device).argmax(1)
                srow[name] = macro_recall(yt, sp, n)
            shift_rows.append(srow)
        log(f"  fold {f + 1}/{len(splits)}: macro recall {rows[-1]['macro recall']:.3f}, "
            f"{rows[-1]['seconds']:.0f} s")
    return ConfigResult(
        config=cfg.text, weights=weights, recipe=recipe, folds=pd.DataFrame(rows),
        per_class=pd.DataFrame(per_class, columns=classes, index=pd.RangeIndex(1, len(splits) + 1, name="fold")),
        confusion=confusion,
        shifts=pd.DataFrame(shift_rows).set_index("fold") if shift_rows else pd.DataFrame(),
        notes=sorted(notes), seconds=time.perf_counter() - start)


def to_record(r: ConfigResult) -> dict:
    """A configuration's result as plain data (what the results cache and cv.json hold)."""
    return {"config": r.config, "weights": r.weights, "recipe": r.recipe, "notes": list(r.notes), "seconds": r.seconds,
            "folds": r.folds.to_dict(orient="records"),
            "per_class": {"columns": list(r.per_class.columns), "rows": r.per_class.to_numpy().tolist()},
            "confusion": np.asarray(r.confusion).tolist(),
            "shifts": r.shifts.reset_index().to_dict(orient="records") if len(r.shifts) else []}


def from_record(d: dict) -> ConfigResult:
    per_class = pd.DataFrame(np.asarray(d["per_class"]["rows"], dtype=float), columns=d["per_class"]["columns"],
                             index=pd.RangeIndex(1, len(d["per_class"]["rows"]) + 1, name="fold"))
    shifts = pd.DataFrame(d["shifts"]).set_index("fold") if d["shifts"] else pd.DataFrame()
    return ConfigResult(config=d["config"], weights=d["weights"], recipe=d["recipe"], folds=pd.DataFrame(d["folds"]),
                        per_class=per_class, confusion=np.asarray(d["confusion"], dtype=np.int64), shifts=shifts,
                        notes=list(d["notes"]), seconds=float(d["seconds"]))


def code_version() -> str:
    """A digest of the project's code (every lib/*.py file): results computed by other code are not reused."""
    h = hashlib.sha256()
    for f in sorted((params.ROOT / "lib").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cached(cache_dir: str | Path, key_parts: tuple, run) -> tuple[ConfigResult, bool]:
    """`run()`'s result, kept as plain JSON under cache_dir and reused when the same key comes again.

    The key covers what the caller passes (configuration, data fingerprint, folds, shifts) and
    the code version. Returns (result, reused)."""
    from lib.io import read_json, write_json_atomic

    key = cache_key(*key_parts, code_version())
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        try:
            record = read_json(path)
        except ValueError:
            record = None  # unreadable: computed again and overwritten
        if isinstance(record, dict) and record.get("key") == key:
            return from_record(record["result"]), True
    result = run()
    write_json_atomic(path, {"key": key, "code_version": code_version(), "result": to_record(result)})
    return result, False


def summary_row(r: ConfigResult) -> dict:
    f = r.folds
    row = {"config": r.config, "weights used": r.weights, "recipe run": r.recipe,
           "macro recall": f"{f['macro recall'].mean():.3f} ± {f['macro recall'].std(ddof=1):.3f}",
           "accuracy": f"{f['accuracy'].mean():.3f} ± {f['accuracy'].std(ddof=1):.3f}",
           "miss rate": f"{f['miss rate'].mean():.3f}" if f["miss rate"].notna().all() else "n/a",
           "min fold recall": round(float(f["macro recall"].min()), 3),
           "minutes": round(r.seconds / 60, 1)}
    if len(r.shifts):
        base = r.folds["macro recall"].mean()
        for name in ("down-up 128 px", "down-up 64 px"):
            if name in r.shifts:
                row[f"{name} drop (points)"] = round(100 * (base - r.shifts[name].mean()), 1)
    return row
