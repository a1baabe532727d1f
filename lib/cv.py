"""Group k-fold cross-validation of training configurations on one dataset.

Groups are the leakage audit's duplicate groups (bytes, pixels, name family, perceptual
hashes), so an original and its offline-augmented copies always sit in the same fold. Each
configuration trains through `lib.recipes.train_recipe` (the training notebook's code) on the
other folds' files, copies included, and is scored on the held-out fold with one image per
group: its original, not its augmented copies.

A configuration is one line of space-separated `key:value` overrides of the training
parameters, e.g. ``arch:efficientnet_lite0 weights:imagenet recipe:lpft epochs:10``; every key
and value is checked against the parameter schema.

Decisions between configurations rest on paired comparisons: every configuration is scored on
the same folds (and, with `cv_repeats` above 1, on several fold assignments), and `paired`
tests each one's per-fold difference to the reference (the first configuration) with the
corrected resampled t-test (Nadeau & Bengio, 2003), which widens the naive interval for the
training data that the folds share.
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
from lib.decision import CLEAN, decide
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
        overrides[key] = params.check(key, value, f"cv config {text!r}")  # type, choices and range
    return Config(text=text, overrides=overrides, P={**base, **overrides})


def parse_configs(texts: list[str], base: dict) -> list[Config]:
    """Every configuration line, checked; at least one is needed."""
    if not texts:
        raise params.ParamError("cv_configs is empty: name at least one configuration")
    return [parse_config(t, base) for t in texts]


def short_names(configs: list[Config]) -> list[str]:
    """Each configuration named by the parameters it changes from the first (the reference), e.g.
    ``epochs:60``: what tables and figures show in place of lines that run to 200 characters."""
    ref, names = configs[0].P, []
    for i, c in enumerate(configs):
        raw = dict(token.partition(":")[::2] for token in c.text.split())
        changed = " ".join(f"{k}:{raw.get(k, c.P[k])}" for k in c.P if c.P[k] != ref.get(k))
        name = "reference" if i == 0 else changed or "the reference again"
        names.append(name if name not in names else f"{name} (#{i + 1})")
    return names


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


def repeated_folds(df: pd.DataFrame, y: np.ndarray, k: int, seed: int, repeats: int = 1):
    """`assign_folds` for each of `repeats` fold seeds (seed, seed + 1, ...): the k * repeats splits in
    order, and each file's fold number per repeat (columns `fold`, or `fold r1`, `fold r2`, ...)."""
    if repeats < 1:
        raise ValueError(f"cv_repeats must be at least 1, got {repeats}")
    splits, columns = [], {}
    for r in range(repeats):
        s, fold_of = assign_folds(df, y, k, seed + r)
        splits += s
        columns["fold" if repeats == 1 else f"fold r{r + 1}"] = fold_of
    return splits, pd.DataFrame(columns, index=df.index)


def decoded(paths, sizes, cache_dir: str | Path, *, resize: str, background: float, log=print) -> dict:
    """Every image decoded once per input size ({size: [N, 1, size, size]}) into the on-disk image
    cache under cache_dir (`lib.cache.gray_images`: keyed by each file's fingerprint and the
    preprocessing, so a rerun reads them back; folds read their rows from it)."""
    from lib import cache

    out = {}
    for size in sorted(set(sizes)):
        t0 = time.perf_counter()
        out[size] = cache.gray_images(paths, size, cache_dir, resize=resize, background=background)
        log(f"{len(out[size])} images at {size} px ready in {time.perf_counter() - t0:.1f} s ({out[size].path.name}).")
    return out


# Test-time averaging: the softmax probabilities of an image averaged over views of it. The first four
# views of `dihedral` (the image, its two mirror images, its half turn) keep the orientation of a
# line/space pattern; all eight (the symmetries of the square) also turn it by a quarter.
TTA_VIEWS = {"flips": 4, "flips and quarter turns": 8}


def dihedral(x: np.ndarray, i: int) -> np.ndarray:
    """View i (0-7) of images x [..., H, W] under the symmetries of the square: 0 as given, 1 mirrored
    left-right, 2 upside down, 3 both (a half turn); 4-7 the same after swapping rows and columns
    (a transpose, then the two quarter turns and the anti-transpose). Square images keep their shape."""
    if not 0 <= i < 8:
        raise ValueError(f"dihedral view {i}: there are 8 (0-7)")
    if i >= 4:
        x = np.swapaxes(x, -1, -2)
    if i % 4 in (1, 3):
        x = x[..., ::-1]
    if i % 4 in (2, 3):
        x = x[..., ::-1, :]
    return np.ascontiguousarray(x)


def view_averaged(logits_of, x: np.ndarray, views: dict = TTA_VIEWS, first: np.ndarray | None = None) -> dict:
    """{name: softmax probabilities [N, classes] averaged over the first n views of `dihedral`} for each
    name: n of `views`, every view scored once; `logits_of` maps images [N, C, H, W] to logits, and
    `first` gives view 0's probabilities when they are already at hand."""
    from lib.calibration import probabilities

    probs = [first if first is not None else probabilities(logits_of(dihedral(x, 0)))]
    probs += [probabilities(logits_of(dihedral(x, i))) for i in range(1, max(views.values()))]
    return {name: np.mean(probs[:n], axis=0) for name, n in views.items()}


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
    # out-of-fold scores of every scored image: fold, index (row of the audited file table), true, pred,
    # and one probability column per class
    oof: pd.DataFrame = field(default_factory=pd.DataFrame)


def run_config(cfg: Config, gray: np.ndarray, y: np.ndarray, splits, representative: np.ndarray,
               classes: list[str], *, device, shift_names=(), build_dir="build", progress: bool = False,
               log=print, feature_cache: dict | None = None, k: int | None = None,
               groups: np.ndarray | None = None) -> ConfigResult:
    """Train and score one configuration on every fold.

    A configuration with `test_views` above 1 is scored, under every shift too, as the average of its
    softmax probabilities over that many views (`lib.model.ViewAveraged`, what its exported model
    computes); the others are also scored with each test-time averaging of `TTA_VIEWS`.

    For probe and lpft the pooled features of every image under the initial (pretrained)
    weights are computed once and shared by all folds, and by every configuration with the
    same architecture, weights and input size through `feature_cache`. `k` is the number of folds
    per repeat (default: all splits are one repeat). `groups` (the duplicate group of every image) keep
    copies together when a `distill` configuration cross-fits its teachers inside a fold.

    Every prediction, under every shift and view average too, is `lib.decision.decide` under the
    configuration's `clean_guard`, on the softmax at temperature 1 (no validation split to fit one).
    """
    from lib import engine, model as net, recipes, shifts as shift_lib
    from lib.calibration import probabilities
    from lib.preprocess import normalize

    n = len(classes)
    k = k or len(splits)
    guard = float(cfg.P.get("clean_guard", 0.0))
    rows, per_class, shift_rows, oof = [], [], [], []
    confusion = np.zeros((n, n), np.int64)
    notes: set[str] = set()
    weights, recipe = "", cfg.P["recipe"]
    start = time.perf_counter()
    for f, (tr, te) in enumerate(splits):
        t0 = time.perf_counter()
        generator = engine.seed_everything(cfg.P["seed"] + f, cfg.P["deterministic"])
        prepared = recipes.prepare(cfg.P, n, build_dir=build_dir)
        feats = None
        if prepared.recipe in ("probe", "lpft"):
            key = (cfg.P["arch"], cfg.P["width"], prepared.weights["source"], prepared.weights.get("sha256"),
                   prepared.weights["detail"], cfg.P["image_size"], len(gray))
            cache = feature_cache if feature_cache is not None else {}
            if key not in cache:
                cache[key] = recipes.pooled_features(prepared.model, gray, device)
            feats = {"train": cache[key][tr]}
        trained = recipes.train_recipe(cfg.P, {"train": gray[tr]}, {"train": y[tr]}, n, device=device,
                                       generator=generator, progress=progress, build_dir=build_dir,
                                       prepared=prepared, features=feats,
                                       groups=None if groups is None else np.asarray(groups)[tr])
        weights, recipe = trained.weights["source"], trained.recipe
        notes.update(trained.notes)
        if trained.weights["source"] == "none" and cfg.P["weights"] not in ("none",):
            notes.add(trained.weights["detail"])
        test = te[representative[te]]
        yt = y[test]

        # a configuration with test_views above 1 is scored (and shifted) as its view average, as it would ship
        scorer = net.with_views(trained.model, cfg.P.get("test_views", 1))

        def predict(g, model=scorer):
            return decide(probabilities(engine.logits(model, normalize(g), device=device)), classes, guard)

        x = normalize(gray[test])
        proba = probabilities(engine.logits(scorer, x, device=device))
        pred = decide(proba, classes, guard)
        averaged = {} if scorer is not trained.model else {
            name: decide(p, classes, guard) for name, p in
            view_averaged(lambda v: engine.logits(trained.model, v, device=device), x, first=proba).items()}
        oof.append(pd.DataFrame({"fold": f + 1, "index": test, "true": yt, "pred": pred,
                                 **{c: p for c, p in zip(classes, proba.T)},
                                 **{f"pred ({name})": p for name, p in averaged.items()}}))
        dvc = defect_vs_clean(yt, pred, classes)
        rows.append({"fold": f + 1, "repeat": f // k + 1, "train images": len(tr), "test groups": len(test),
                     "macro recall": macro_recall(yt, pred, n), "accuracy": float((pred == yt).mean()),
                     "miss rate": dvc["miss_rate"], "seconds": time.perf_counter() - t0,
                     **{f"macro recall ({name})": macro_recall(yt, p, n) for name, p in averaged.items()},
                     **{f"miss rate ({name})": defect_vs_clean(yt, p, classes)["miss_rate"]
                        for name, p in averaged.items()}})
        per_class.append([float((pred[yt == c] == c).mean()) if (yt == c).any() else np.nan for c in range(n)])
        np.add.at(confusion, (yt, pred), 1)
        if shift_names:
            table = shift_lib.robustness(predict, gray[test], yt, classes, names=shift_names, seed=f)
            shift_rows.append({"fold": f + 1, **table["macro recall"].to_dict()})
        log(f"  fold {f + 1}/{len(splits)}: macro recall {rows[-1]['macro recall']:.3f}, "
            f"{rows[-1]['seconds']:.0f} s")
    return ConfigResult(
        config=cfg.text, weights=weights, recipe=recipe, folds=pd.DataFrame(rows),
        per_class=pd.DataFrame(per_class, columns=classes, index=pd.RangeIndex(1, len(splits) + 1, name="fold")),
        confusion=confusion,
        shifts=pd.DataFrame(shift_rows).set_index("fold") if shift_rows else pd.DataFrame(),
        notes=sorted(notes), seconds=time.perf_counter() - start,
        oof=pd.concat(oof, ignore_index=True) if oof else pd.DataFrame())


def to_record(r: ConfigResult) -> dict:
    """A configuration's result as plain data (what the results cache and cv.json hold)."""
    return {"config": r.config, "weights": r.weights, "recipe": r.recipe, "notes": list(r.notes), "seconds": r.seconds,
            "folds": r.folds.to_dict(orient="records"),
            "per_class": {"columns": list(r.per_class.columns), "rows": r.per_class.to_numpy().tolist()},
            "confusion": np.asarray(r.confusion).tolist(),
            "shifts": r.shifts.reset_index().to_dict(orient="records") if len(r.shifts) else [],
            "oof": r.oof.to_dict(orient="list")}


def from_record(d: dict) -> ConfigResult:
    per_class = pd.DataFrame(np.asarray(d["per_class"]["rows"], dtype=float), columns=d["per_class"]["columns"],
                             index=pd.RangeIndex(1, len(d["per_class"]["rows"]) + 1, name="fold"))
    shifts = pd.DataFrame(d["shifts"]).set_index("fold") if d["shifts"] else pd.DataFrame()
    return ConfigResult(config=d["config"], weights=d["weights"], recipe=d["recipe"], folds=pd.DataFrame(d["folds"]),
                        per_class=per_class, confusion=np.asarray(d["confusion"], dtype=np.int64), shifts=shifts,
                        notes=list(d["notes"]), seconds=float(d["seconds"]), oof=pd.DataFrame(d.get("oof", {})))


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
           "worst fold": round(float(f["macro recall"].min()), 3),
           "minutes": round(r.seconds / 60, 1)}
    if len(r.shifts):
        base = r.folds["macro recall"].mean()
        for name in ("down-up 128 px", "down-up 64 px"):
            if name in r.shifts:
                row[f"{name} drop (points)"] = round(100 * (base - r.shifts[name].mean()), 1)
    return row


def assign_folds(df: pd.DataFrame, y: np.ndarray, k: int, seed: int):
    """`folds` over the duplicate groups, plus each file's fold number (1..k); raises when a group
    crosses folds (it never should: the check keeps the claim honest)."""
    splits = folds(y, df["group"], k, seed)
    fold_of = np.zeros(len(df), int)
    for f, (_, te) in enumerate(splits):
        fold_of[te] = f + 1
    crossing = int(df.assign(fold=fold_of).groupby("group")["fold"].nunique().gt(1).sum())
    if crossing:
        raise AssertionError(f"{crossing} duplicate groups cross folds")
    return splits, fold_of


def group_table(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Files and duplicate groups (each scored once, by its representative) per class."""
    reps = df["representative"].to_numpy()
    table = pd.DataFrame({"files": df.groupby("class").size(),
                          "groups (scored images)": df[reps].groupby("class").size()}).reindex(labels).fillna(0).astype(int)
    table.loc["all"] = table.sum()
    return table


# parameters that cannot change one configuration's result: the list of the others
NOT_IN_RESULT_KEY = ("cv_configs",)


def result_key(c: Config, data_key: str, splits, shift_names) -> tuple:
    """What one configuration's cached result depends on: its line and parameters (but not the other
    lines of `cv_configs`, so adding a configuration reuses the rows already run), the data, the
    folds and the shifts."""
    folds_key = [hashlib.sha256(np.asarray(te).tobytes()).hexdigest()[:8] for _, te in splits]
    own = sorted((k, v) for k, v in c.P.items() if k not in NOT_IN_RESULT_KEY)
    return c.text, own, data_key, folds_key, list(shift_names)


def run_all(configs: list[Config], gray_by_size: dict, y: np.ndarray, splits, representative: np.ndarray,
            labels: list[str], *, device, shift_names, build_dir, cache_dir, data_key: str, k: int | None = None,
            log=print, groups: np.ndarray | None = None) -> list[ConfigResult]:
    """Every configuration on every fold, each result kept as plain JSON under cache_dir (keyed by the
    configuration, the data, the folds, the shifts and the code version) and reused when it matches,
    so an interrupted report resumes where it stopped. Synthetic-pretrained bodies are made first."""
    from lib import pretrain

    for c in configs:
        pretrain.ready(c.P, build_dir=build_dir, log=log)
    results, feature_cache = [], {}
    for c in configs:
        log(c.text)
        r, reused = cached(cache_dir, result_key(c, data_key, splits, shift_names),
                           lambda c=c: run_config(c, gray_by_size[c.P["image_size"]], y, splits, representative,
                                                  labels, device=device, shift_names=shift_names,
                                                  build_dir=build_dir, feature_cache=feature_cache, log=log,
                                                  k=k, groups=groups))
        log(f"  {'reused' if reused else 'ran'}: {r.seconds / 60:.1f} min when run")
        results.append(r)
    return results


def paired(results: list[ConfigResult], k: int, reference: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Each configuration's macro recall against the reference's on the same folds, in points.

    The mean per-fold difference with its `level` interval and two-sided p-value by the corrected
    resampled t-test (Nadeau & Bengio, 2003): the variance of the J = folds x repeats differences
    is scaled by (1/J + n_test/n_train), n_test/n_train = 1/(k - 1) for k folds, since folds share
    training data and a plain paired t-test would be overconfident. Also the folds each side won.
    """
    ref = results[reference]
    base = ref.folds.set_index("fold")["macro recall"]
    rows = []
    for r in results:
        if r is ref:
            continue
        d = 100 * (r.folds.set_index("fold")["macro recall"] - base).dropna()
        rows.append({"config": r.config, "reference": ref.config, **corrected_t(d, k, level)})
    return pd.DataFrame(rows, columns=["config", "reference", "folds", "difference (points)", "low", "high", "p",
                                       "folds better", "folds worse"])


def corrected_t(d: pd.Series, k: int, level: float = 0.95) -> dict:
    """The corrected resampled t-test of per-fold differences d (points) from k-fold CV: the mean with
    its `level` interval, the two-sided p-value, and the folds each side won (see `paired`)."""
    from scipy import stats

    J = len(d)
    sd = float(d.std(ddof=1)) if J > 1 else float("nan")
    se = sd * np.sqrt(1 / J + 1 / (k - 1)) if J > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, J - 1) * se) if J > 1 else float("nan")
    t = (float(d.mean()) / se if se > 0 else (0.0 if d.mean() == 0 else np.inf)) if J > 1 else float("nan")
    return {"folds": J, "difference (points)": float(d.mean()), "low": float(d.mean()) - half,
            "high": float(d.mean()) + half, "p": float(2 * stats.t.sf(abs(t), J - 1)) if J > 1 else float("nan"),
            "folds better": int((d > 1e-9).sum()), "folds worse": int((d < -1e-9).sum())}


def averaged_table(results: list[ConfigResult], k: int) -> pd.DataFrame:
    """Test-time averaging (`TTA_VIEWS`) against the single view, per configuration: each model scored
    on the same held-out images as given and view-averaged. Mean macro recall, worst fold, miss rate,
    and the paired difference of the averaged to the single view (points, corrected resampled t-test).
    Empty for results computed before view averaging was scored."""
    rows = []
    for r in results:
        f = r.folds
        for name in TTA_VIEWS:
            col = f"macro recall ({name})"
            if col not in f:
                continue
            t = corrected_t(100 * (f[col] - f["macro recall"]), k)
            rows.append({"config": r.config, "views": name, "single view": float(f["macro recall"].mean()),
                         "averaged": float(f[col].mean()), "worst fold, averaged": float(f[col].min()),
                         "miss rate, averaged": float(f[f"miss rate ({name})"].mean()),
                         "averaged − single, points [95%], p": paired_text(t),
                         "folds better / worse": f"{t['folds better']} / {t['folds worse']}"})
    return pd.DataFrame(rows)


def probability_averages(results: list[ConfigResult], classes: list[str], k: int, reference: int = 0,
                         clean_guard: float = 0.0) -> pd.DataFrame:
    """Configurations as an ensemble: the reference averaged with each other configuration (and, with
    three or more, all of them together), their out-of-fold softmax probabilities averaged image by
    image at equal weights, scored per fold as a configuration is, and compared with the reference on
    the same folds (corrected resampled t-test). What a two-model ensemble would score, and so the mark
    a distilled student of it could aim at; not one model (it runs every member). Only results holding
    out-of-fold probabilities for the same images and folds take part; empty with fewer than two.
    `classes` is the run's class list in label order (the order `true` counts in); the averages are
    decided under `clean_guard` (`lib.decision.decide`)."""
    key = ["fold", "index"]
    usable = [r for r in results if len(r.oof) and set(classes) <= set(r.oof)]
    ref = results[reference]
    if not any(r is ref for r in usable) or len(usable) < 2:
        return pd.DataFrame()
    frames = {id(r): r.oof.sort_values(key).reset_index(drop=True) for r in usable}
    base = ref.folds.set_index("fold")["macro recall"]
    groups = [[ref, r] for r in usable if r is not ref] + ([usable] if len(usable) > 2 else [])
    rows = []
    for members in groups:
        o = frames[id(members[0])]
        if any(not frames[id(m)][key].equals(o[key]) for m in members[1:]):
            continue  # scored on other folds or images: not comparable image by image
        pred = decide(np.mean([frames[id(m)][classes].to_numpy() for m in members], axis=0), classes, clean_guard)
        true = o["true"].to_numpy().astype(int)
        f = pd.DataFrame([{"fold": fold, "macro recall": macro_recall(true[i], pred[i], len(classes)),
                           "miss rate": defect_vs_clean(true[i], pred[i], classes)["miss_rate"]}
                          for fold, i in o.groupby("fold").indices.items()]).set_index("fold")
        t = corrected_t(100 * (f["macro recall"] - base).dropna(), k)
        rows.append({"averaged": " + ".join(m.config for m in members), "macro recall, mean": float(f["macro recall"].mean()),
                     "std": float(f["macro recall"].std(ddof=1)), "worst fold": float(f["macro recall"].min()),
                     "miss rate": float(f["miss rate"].mean()), "vs reference, points [95%], p": paired_text(t),
                     "folds better / worse": f"{t['folds better']} / {t['folds worse']}",
                     "per fold": ", ".join(f"{v:.3f}" for v in f["macro recall"])})
    return pd.DataFrame(rows)


GUARDS = (0.0, 0.3, 0.4, 0.5)


def guard_table(results: list[ConfigResult], configs: list[Config], classes: list[str], k: int,
                guards=GUARDS) -> pd.DataFrame:
    """The `clean` guard (`lib.decision.decide`) at several thresholds, applied to each configuration's
    out-of-fold probabilities (no training): mean and worst-fold macro recall, misses (defects called
    `clean`) and `clean` images called a defect, summed over folds, and the paired difference per fold
    to the guard the configuration ran with (corrected resampled t-test). Empty without `clean` or
    out-of-fold probabilities."""
    if CLEAN not in classes:
        return pd.DataFrame()
    c, rows = classes.index(CLEAN), []
    for r, cfg in zip(results, configs):
        if not len(r.oof) or not set(classes) <= set(r.oof):
            continue
        own = float(cfg.P.get("clean_guard", 0.0))
        prob, true = r.oof[classes].to_numpy(), r.oof["true"].to_numpy().astype(int)
        folds = r.oof.groupby("fold").indices
        per = {}
        for g in sorted(set(guards) | {own}):
            pred = decide(prob, classes, g)
            per[g] = pd.Series({f: macro_recall(true[i], pred[i], len(classes)) for f, i in folds.items()})
            rows.append({"config": r.config, "clean_guard": g, "runs with": "yes" if g == own else "",
                         "macro recall, mean": float(per[g].mean()), "worst fold": float(per[g].min()),
                         "defects called clean": int(((pred == c) & (true != c)).sum()),
                         "clean called a defect": int(((pred != c) & (true == c)).sum()),
                         "defects": int((true != c).sum()), "clean images": int((true == c).sum()), "_g": g})
        for row in rows[-len(per):]:
            t = corrected_t(100 * (per[row.pop("_g")] - per[own]), k)
            row["vs the guard it runs with, points [95%], p"] = "reference" if row["runs with"] else paired_text(t)
    return pd.DataFrame(rows)


def averaged_per_class(r: ConfigResult, classes: list[str]) -> pd.DataFrame:
    """One configuration's per-class recall (mean over folds), as given and under each test-time
    averaging, from its out-of-fold predictions: which classes the flips and turns help or hurt."""
    o = r.oof
    out = {}
    for col, name in [("pred", "single view")] + [(f"pred ({v})", v) for v in TTA_VIEWS]:
        if col in o:
            hit = (o[col] == o["true"]).groupby([o["fold"], o["true"]]).mean().unstack()
            out[name] = hit.mean().rename(index=dict(enumerate(classes))).reindex(classes)
    return pd.DataFrame(out).T


def paired_text(row) -> str:
    """A paired comparison row as one cell: '+2.1 [-1.3, +5.5], p 0.20'."""
    return f"{row['difference (points)']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}], p {row['p']:.2f}"


def best(results: list[ConfigResult]) -> ConfigResult:
    """The configuration with the highest mean macro recall over folds."""
    return max(results, key=lambda r: r.folds["macro recall"].mean())


def per_class_table(results: list[ConfigResult]) -> pd.DataFrame:
    """Per-class recall, mean over folds, one row per configuration."""
    return pd.DataFrame({r.config: r.per_class.mean() for r in results}).T


def shift_table(results: list[ConfigResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean macro recall over folds unshifted and under each shift (one row per configuration), and the
    drop from unshifted in points. Empty frames when shifts were not scored."""
    if not any(len(r.shifts) for r in results):
        return pd.DataFrame(), pd.DataFrame()
    table = pd.DataFrame({r.config: pd.concat([pd.Series({"none": r.folds["macro recall"].mean()}), r.shifts.mean()])
                          for r in results}).T
    return table, (100 * (table[["none"]].to_numpy() - table)).drop(columns="none")


def record(results: list[ConfigResult], df: pd.DataFrame, root, k: int, seconds: float, repeats: int = 1) -> dict:
    """The record of `cv/cv.json`."""
    import os
    import platform

    comparison = {row["config"]: {key: row[key] for key in ("difference (points)", "low", "high", "p", "folds better",
                                                            "folds worse")}
                  for row in paired(results, k).to_dict(orient="records")} if len(results) > 1 else {}
    return {"data_dir": str(root), "repeats": repeats, "reference": results[0].config, "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "images": int(len(df)),
            "groups": int(df["group"].nunique()), "folds": k, "seconds": seconds,
            "configs": [{"config": r.config, "weights": r.weights, "recipe": r.recipe, "seconds": r.seconds,
                         "notes": r.notes, "macro_recall_mean": float(r.folds["macro recall"].mean()),
                         "macro_recall_std": float(r.folds["macro recall"].std(ddof=1)),
                         "worst_fold": float(r.folds["macro recall"].min()),
                         "vs_reference_points": comparison.get(r.config),
                         "accuracy_mean": float(r.folds["accuracy"].mean()),
                         "miss_rate_mean": float(r.folds["miss rate"].mean()),
                         "folds": r.folds.to_dict(orient="records"), "per_class_recall": r.per_class.mean().to_dict(),
                         "confusion": r.confusion.tolist(),
                         "shifts": {} if not len(r.shifts) else r.shifts.mean().to_dict(),
                         "view_averaged": {name: {"macro_recall_mean": float(r.folds[f"macro recall ({name})"].mean()),
                                                  "miss_rate_mean": float(r.folds[f"miss rate ({name})"].mean())}
                                           for name in TTA_VIEWS if f"macro recall ({name})" in r.folds}}
                        for r in results]}
