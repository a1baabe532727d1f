"""The dataset: finding the images of an image-folder tree, what each file is, the split manifest,
decoding many files at once (in memory, or into the on-disk cache of `lib.cache` that every stage
shares), and making the run's images ready (`python -m lib.data prepare`).

Layouts: one folder per class, or a pre-split tree of train / val / test folders of class folders.
Your own image folder is only ever read; the embedded synthetic dataset is rendered (by
`lib.synthetic`) only into a folder the project owns (`lib.io`).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lib import cache
from lib.preprocess import FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, bit_depth, decode, load_gray, to_gray


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the folder or file."""


SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}


def class_lookup(classes: list[str], aliases=()) -> dict[str, str]:
    """Lower-cased folder name -> canonical class, from the class list and "alias:class" entries."""
    lookup = {c.lower(): c for c in classes}
    for entry in aliases:
        alias, sep, target = entry.partition(":")
        if not sep or not alias.strip() or target.strip() not in classes:
            raise DataError(f"class alias {entry!r} must read alias:class with class one of {classes}")
        lookup[alias.strip().lower()] = target.strip()
    return lookup


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    """'presplit' when root holds split folders (train/, val|valid|validate|validation/, test/), else 'unsplit'."""
    return "presplit" if any(p.name.lower() in SPLIT_NAMES for p in _subfolders(root)) else "unsplit"


def list_images(root: str | Path, classes: list[str], *, aliases=(), unknown_folders: str = "fail"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All image files of an image-folder tree, as rows (path, class, folder, given_split).

    Layouts: `<root>/<class>/...` or `<root>/{train,val|valid|validate|validation,test}/<class>/...`
    (given_split holds the split then; a missing validation or test split is carved out of
    train later, by duplicate group). Class folders match `classes` case-insensitively or
    through `aliases` ("alias:class"); files in nested folders belong to the class folder
    they sit in. Folders matching no class (and, in a pre-split tree, top-level folders that
    are no split) are returned as the second frame (path, files); with unknown_folders="fail"
    they raise instead. Raises DataError naming a missing root, a pre-split tree without
    train/, a split named by two folders, a class without any image file, or a bad alias.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (set data_dir in your params file to your image folder)")
    lookup = class_lookup(classes, aliases)
    rows, unmatched = [], []
    if detect_layout(root) == "presplit":
        parents = []
        for p in _subfolders(root):
            split = SPLIT_NAMES.get(p.name.lower())
            if split is None:
                unmatched.append({"folder": str(p), "image_files": _count_images(p)})
            else:
                parents.append((split, p))
        given = [s for s, _ in parents]
        twice = sorted({s for s in given if given.count(s) > 1})
        if twice:
            raise DataError(f"{root}: several folders name the {twice} split(s): "
                            + ", ".join(p.name for s, p in parents if s in twice))
        if "train" not in given:
            raise DataError(f"{root} is a pre-split tree ({', '.join(p.name + '/' for _, p in parents)}) without a "
                            f"train/ folder: add one, or arrange the images one folder per class")
    else:
        parents = [(None, root)]
    for split, parent in parents:
        for folder in _subfolders(parent):
            files = _image_files(folder)
            cls = lookup.get(folder.name.lower())
            if cls is None:
                unmatched.append({"folder": str(folder), "image_files": len(files)})
                continue
            rows += [{"path": str(p), "class": cls, "folder": folder.name, "given_split": split} for p in files]
    unmatched = pd.DataFrame(unmatched, columns=["folder", "image_files"])
    if len(unmatched) and unknown_folders == "fail":
        raise DataError("folders that match no class (add an alias in class_aliases, or set unknown_folders: "
                        "ignore): " + ", ".join(unmatched["folder"]))
    files = pd.DataFrame(rows, columns=["path", "class", "folder", "given_split"])
    missing = [c for c in classes if c not in set(files["class"])]
    if missing:
        raise DataError(f"no image files for class(es) {missing} under {root} "
                        f"(class folders there: {sorted({f.name for _, p in parents for f in _subfolders(p)})}); "
                        f"add images, or remove the class from `classes`")
    return files, unmatched


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _count_images(folder: Path) -> int:
    return len(_image_files(folder))


def inspect_file(path: str) -> dict:
    """Decode one file completely; report its size, mode, bit depth and intensity, or why it failed."""
    info = {"bytes": os.path.getsize(path), "width": None, "height": None, "mode": None, "bit_depth": None,
            "format": None, "extension_matches": None, "mean": None, "std": None, "readable": False, "reason": ""}
    if info["bytes"] == 0:
        info["reason"] = "empty file (0 bytes)"
        return info
    try:
        im = decode(path)
        gray = to_gray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        info["reason"] = f"too many pixels: {e}"
        return info
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported, not raised
        info["reason"] = f"{type(e).__name__}: {e}".strip()
        return info
    from lib.quality import measures

    with Image.open(path) as raw:
        fmt = raw.format or ""
    info.update(width=im.width, height=im.height, mode=im.mode, bit_depth=bit_depth(im), format=fmt,
                extension_matches=Path(path).suffix.lower() in FORMAT_EXTENSIONS.get(fmt, (Path(path).suffix.lower(),)),
                mean=float(gray.mean()), std=float(gray.std()), readable=True, **measures(gray))
    return info


def inventory(root: str | Path, classes: list[str], workers: int = 2, chunk: int = 2048,
              **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """list_images (kwargs go to it) + inspect_file for each file (`table_of`)."""
    files, unmatched = list_images(root, classes, **kwargs)
    return pd.concat([files, table_of(inspect_file, files["path"], workers=workers, chunk=chunk)], axis=1), unmatched


def table_of(fn, items, workers: int = 2, chunk: int = 2048, columns: list[str] | None = None) -> pd.DataFrame:
    """fn(item) -> dict for each item, in parallel over items (a process pool), as one table; the
    records become rows `chunk` items at a time (a record as a dict costs about 20x its table row)."""
    items = list(items)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = [pd.DataFrame(list(pool.map(fn, items[i : i + chunk], chunksize=32)), columns=columns)
                 for i in range(0, len(items), chunk)]
    return pd.concat(parts, ignore_index=True).infer_objects() if parts else pd.DataFrame(columns=columns)


def describe_layout(inventory: pd.DataFrame) -> str:
    """The layout an inventory came in, in words."""
    given = sorted(inventory["given_split"].dropna().unique())
    if given:
        return (f"pre-split ({', '.join(given)}; a missing validation or test split is carved out of train by the "
                f"leakage audit)")
    return "one folder per class (split made by the leakage audit)"


def class_counts(readable: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """Readable images per class (and per given split), each class's share, the folders matched to a
    class by case or alias, and the imbalance ratio (largest / smallest class). A class without a
    readable image raises DataError naming it."""
    counts = readable["class"].value_counts().reindex(classes, fill_value=0).rename("images").to_frame()
    if readable["given_split"].notna().any():
        counts = counts.join(pd.crosstab(readable["class"], readable["given_split"])).fillna(0).astype(int)
    empty = counts.index[counts["images"] == 0].tolist()
    if empty:
        raise DataError(f"no readable images for class(es) {empty}: every file of theirs is unreadable")
    counts["share"] = (counts["images"] / counts["images"].sum()).round(3)
    renamed = readable.loc[readable["folder"] != readable["class"], ["folder", "class"]].drop_duplicates()
    return counts, renamed.reset_index(drop=True), float(counts["images"].max() / counts["images"].min())


def image_properties(readable: pd.DataFrame, classes: list[str]) -> dict[str, pd.DataFrame]:
    """Image sizes (one column per size, or per-class width / height statistics when there are many),
    modes and bit depths per class."""
    sizes = readable["width"].astype(int).astype(str) + "×" + readable["height"].astype(int).astype(str)
    if sizes.nunique() <= 12:
        size_table = pd.crosstab(readable["class"], sizes).reindex(classes)
    else:  # many sizes: summarise them per class instead of one column each
        size_table = readable.groupby("class")[["width", "height"]].describe(percentiles=[0.5]).round(0).reindex(classes)
    return {"size": size_table, **{col: pd.crosstab(readable["class"], readable[col]).reindex(classes)
                                   for col in ("mode", "bit_depth")}}


def load_split(build_dir: str | Path, classes: list[str] | None = None) -> pd.DataFrame:
    """The split manifest the leakage audit wrote (<build_dir>/split/split.csv: path, class, split,
    group ...); with `classes`, every class in it must be one of them."""
    split_csv = Path(build_dir) / "split" / "split.csv"
    if not split_csv.is_file():
        raise DataError(f"split manifest not found: {split_csv} (run the leakage audit stage first)")
    split = pd.read_csv(split_csv)
    unknown = sorted(set(split["class"]) - set(classes or split["class"]))
    if unknown:
        raise DataError(f"{split_csv} holds classes not in the class list: {unknown}")
    return split


@dataclass
class Part:
    """One split of the manifest, decoded: its rows, grayscale images [N, 1, size, size] on 0-1 (in
    memory, or a `lib.cache.DiskArray` read by rows) and labels."""

    rows: pd.DataFrame
    gray: "np.ndarray | cache.DiskArray"
    y: np.ndarray


def load_part(split: pd.DataFrame, name: str, labels: list[str], size: int, *, resize: str = "stretch",
              background: float = 0.0, cache_dir: str | Path | None = None) -> Part:
    """The rows of split `name` ("train", "val" or "test") decoded once by the one preprocessing, with
    label indices in `labels` order. With `cache_dir`, the images live in the on-disk cache there
    (`lib.cache.gray_images`: decoded once for every stage and process, memory independent of
    their number); without it, in memory."""
    rows = split[split["split"] == name].reset_index(drop=True)
    gray = (cache.gray_images(rows["path"], size, cache_dir, resize=resize, background=background) if cache_dir
            else cache_gray(rows["path"], size, resize=resize, background=background))
    return Part(rows, gray, rows["class"].map({c: i for i, c in enumerate(labels)}).to_numpy())


def load_parts(split: pd.DataFrame, names, labels: list[str], P: dict, build_dir: str | Path) -> dict[str, Part]:
    """The named splits decoded by the preprocessing P names (image_size, resize, alpha_background: the
    run's parameters, or those a checkpoint was trained with) into the run's on-disk image cache,
    <build_dir>/cache, which every stage and process shares."""
    return {s: load_part(split, s, labels, P["image_size"], resize=P["resize"], background=P["alpha_background"],
                         cache_dir=Path(build_dir) / "cache") for s in names}


def cache_gray(paths, size: int, *, resize: str = "stretch", background: float = 0.0, workers: int = 2) -> np.ndarray:
    """Decode and resize many files once: float32 [N, 1, size, size] on 0-1."""
    from functools import partial

    load = partial(load_gray, size=size, resize=resize, background=background)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(load, list(paths), chunksize=16))
    return np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, size, size), np.float32)


def label_order(classes: list[str]) -> list[str]:
    """The class order of the network's outputs: sorted, as scikit-learn's LabelEncoder orders them."""
    if len(set(classes)) != len(classes):
        raise DataError(f"duplicate class names in {classes}")
    return sorted(classes)


def fingerprint_tree(root: str | Path) -> dict:
    """A cheap fingerprint of every file under root (relative path, size, mtime), walked folder by
    folder in sorted order, so that memory holds one folder's names at a time."""
    import hashlib

    root = Path(root)
    h = hashlib.sha256()
    n = 0
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if not path.is_file():  # a broken link, a socket
                continue
            st = path.stat()
            h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    return {"root": str(root), "files": n, "sha256": h.hexdigest()}


def description(build_dir: str | Path) -> dict:
    """What `python -m lib.data prepare` recorded about the run's images (<build_dir>/dataset.json), or {}."""
    from lib.io import read_json

    f = Path(build_dir) / "dataset.json"
    return read_json(f) if f.is_file() else {}


def prepare(P: dict) -> dict:
    """Make the run's images ready and describe them.

    data_dir set: your folder, checked to exist and never written to. data_dir empty: the
    embedded synthetic dataset, rendered into synthetic_dir when that folder does not hold
    a rendering with the same settings by the same generator code. Rendering goes through `lib.io.replace_folder`: it
    never touches a folder the project did not create (lib.io.OwnershipError names it).
    """
    import time

    from lib import io
    from lib.params import dataset_root

    root = dataset_root(P)
    info: dict = {"data_dir": P["data_dir"], "root": str(root), "synthetic": not P["data_dir"]}
    if not P["data_dir"]:
        from lib import synthetic

        settings = {"seed": P["seed"], "n_per_class": P["synthetic_per_class"], "size": P["synthetic_size"],
                    "classes": list(P["classes"]), "plant_copies": P["synthetic_plant_copies"],
                    "min_visibility": P["synthetic_min_visibility"], "subtle_share": P["synthetic_subtle_share"],
                    "generator": synthetic.source_hash()}  # changed generator code renders anew
        current = io.marker(root) or {}
        if current.get("what") != synthetic.WHAT or current.get("settings") != settings:
            t = time.perf_counter()

            def finish(folder: Path, manifest: pd.DataFrame) -> dict:
                if settings["plant_copies"]:
                    from lib.plant import plant_copies

                    plant_copies(folder, manifest, settings["plant_copies"], settings["seed"])
                return {"settings": settings, "render_seconds": time.perf_counter() - t}

            synthetic.render_dataset(root, n_per_class=settings["n_per_class"], seed=settings["seed"],
                                     size=settings["size"], classes=tuple(settings["classes"]), workers=2,
                                     progress=True, finish=finish, min_visibility=settings["min_visibility"],
                                     subtle_share=settings["subtle_share"])
            print(f"rendered the synthetic dataset into {root} in {time.perf_counter() - t:.1f} s")
        info["render_seconds"] = io.marker(root)["render_seconds"]
    elif not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (set data_dir in your params file to your image folder)")
    info["fingerprint"] = fingerprint_tree(root)
    return info


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    import yaml

    from lib.io import write_text_if_changed

    ap = argparse.ArgumentParser(description="Prepare the dataset named by a parameter file.")
    ap.add_argument("command", choices=["prepare"])
    ap.add_argument("--params", required=True)
    ap.add_argument("--out", required=True, help="dataset description (JSON), rewritten only when it changed")
    args = ap.parse_args(argv)
    from lib.io import OwnershipError, dumps

    try:
        info = prepare(yaml.safe_load(Path(args.params).read_text()))
    except (DataError, OwnershipError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_if_changed(args.out, dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
