"""Leakage audit: find the same image under several names, group duplicates, split by group.

Detectors
- `sha256`: identical file bytes;
- `pixels`: identical decoded pixels (the same image re-encoded, e.g. PNG -> BMP);
- `name`: the same normalised file stem within one class (`x.png`, `x_aug3.png`, `x (1).png`,
  `x copy.png` are one family);
- `phash`: perceptual hash (DCT) within a Hamming threshold (resized, re-compressed or
  slightly altered copies);
- `dhash`: difference hash within its own threshold, confirmed by a pHash distance of at most
  twice the pHash threshold. dHash alone is blind on SEM images: distinct line/space
  patterns of the same pitch share one gradient sign pattern, so many distinct pairs sit at
  distance 0. As a second opinion it catches copies whose pHash drifted just past the
  threshold (heavier crops or edits) without adding false pairs.

Every pair any detector finds joins one duplicate group (connected components), and a group
never crosses a split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from lib.data import DataError, table_of
from lib.preprocess import decode, to_gray

DETECTORS = ("sha256", "pixels", "name", "phash", "dhash")
SPLITS = ("train", "val", "test")

# Suffixes that copy tools and offline augmentation add to a file stem.
_ALWAYS_STRIP = [
    re.compile(r"[ _-]?aug(mented)?[ _-]?\d*$"),
    re.compile(r"\s*\(\d+\)$"),
    re.compile(r"[ _-]*(-\s*)?copy(\s*\(?\d+\)?)?$"),
]
# "-1" is also how many datasets number distinct images, so it is stripped only when the
# shorter stem exists too (see `name_keys`).
_NUMBERED = re.compile(r"-\d{1,2}$")


def _strip(stem: str) -> str:
    stem = stem.lower().strip()
    changed = True
    while changed:
        changed = False
        for pattern in _ALWAYS_STRIP:
            new = pattern.sub("", stem).strip()
            if new and new != stem:
                stem, changed = new, True
    return stem


def _stem(path) -> str:
    return re.sub(r"\.[^.]+$", "", str(path).replace("\\", "/").rsplit("/", 1)[-1])


def _family(path, cls) -> str:
    return f"{cls}/{_strip(_stem(path))}"


def _numbered(keys: list[str]) -> np.ndarray:
    """Which keys end in a "-N" whose shorter key exists too (those lose the "-N")."""
    present = set(keys)  # the keys themselves (no pair per file: 50,000 of them held 5 MB at once)
    return np.fromiter(((base := _NUMBERED.sub("", k)) != k and base in present for k in keys), bool, len(keys))


def _name_key(path, cls, numbered: bool) -> str:
    key = _family(path, cls)
    return _NUMBERED.sub("", key) if numbered else key


def _key_strings(df: pd.DataFrame) -> list[str]:
    """df's name keys as strings: rebuilt when the audit holds them as codes (`name_numbered` present)."""
    if "name_numbered" not in df:
        return df["name_key"].tolist()
    return [_name_key(p, c, n) for p, c, n in zip(df["path"], df["class"], df["name_numbered"])]


def _keys_and_flags(paths, classes) -> tuple[list[str], np.ndarray]:
    keys = [_family(p, c) for p, c in zip(paths, classes)]
    numbered = _numbered(keys)
    return [_NUMBERED.sub("", k) if n else k for k, n in zip(keys, numbered)], numbered


def name_keys(paths, classes) -> list[str]:
    """Normalised `class/stem` family key for each file."""
    return _keys_and_flags(paths, classes)[0]


def name_key_codes(paths, classes) -> tuple[np.ndarray, np.ndarray]:
    """The name keys as integer codes (equal keys, equal codes) and which keys lost a "-N"; the
    audit holds these instead of the strings (about 4 MB at 50,000 files, at the audit's peak)
    and `save_split` rebuilds each key from its path, class and flag."""
    keys, numbered = _keys_and_flags(paths, classes)
    return pd.factorize(pd.Series(keys, dtype=object))[0].astype(np.int32), numbered


def fingerprint(path: str) -> dict:
    """File-byte SHA-256, decoded-pixel SHA-256 (32-byte digests: held as bytes, a hex string takes
    twice the memory; `save_split` writes hex), 64-bit pHash and 64-bit dHash of one file."""
    with open(path, "rb") as f:
        raw = f.read()
    gray = to_gray(decode(path))
    q = np.round(gray * 65535).astype("<u2")
    pix = hashlib.sha256(np.asarray(q.shape, "<u4").tobytes() + q.tobytes()).digest()
    im8 = Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L")
    return {
        "sha256": hashlib.sha256(raw).digest(),
        "pixels": pix,
        "phash": _as_uint64(imagehash.phash(im8, hash_size=8)),
        "dhash": _as_uint64(imagehash.dhash(im8, hash_size=8)),
    }


def _as_uint64(h: imagehash.ImageHash) -> np.uint64:
    # a numpy uint64, not an int: a table built from ints below 2**63 is int64, and one concatenated
    # with a uint64 table becomes float64, which loses a hash's low bits
    return np.uint64(np.packbits(h.hash.flatten()).view(">u8")[0])


def fingerprints(paths, workers: int = 2, chunk: int = 2048) -> pd.DataFrame:
    """fingerprint() of many files, in parallel over files (`data.table_of`)."""
    df = table_of(fingerprint, paths, workers=workers, chunk=chunk, columns=["sha256", "pixels", "phash", "dhash"])
    for col in ("phash", "dhash"):
        df[col] = df[col].astype(np.uint64)
    return df


def hamming_pairs(hashes: np.ndarray, threshold: int, other: np.ndarray | None = None,
                  block: int = 256, workers: int = 2, confirm: tuple | None = None) -> np.ndarray:
    """Index pairs whose 64-bit hashes differ in at most `threshold` bits.

    With one array: all pairs (i, j), i < j, within it. With `other`: all pairs (i, j) with
    i indexing `hashes` and j indexing `other`. Exhaustive, vectorised over block × block
    tiles (XOR + popcount) and spread over `workers` threads (numpy releases the GIL), so
    memory stays near 10 × block² bytes per thread (0.6 MB), whatever the number of images. (Larger
    tiles were as fast, or 10 % faster, but what each thread allocated for them stayed with the process:
    at 50,000 hashes about 3 MB more for tiles of 512², 14 MB more for 1024².)

    `confirm=(hashes2, threshold2, other2)` keeps only pairs whose second hashes (aligned with
    `hashes` and `other`; other2 None when searching within one array) are within threshold2 too.
    """
    from concurrent.futures import ThreadPoolExecutor

    a = np.ascontiguousarray(hashes, dtype=np.uint64)
    within = other is None
    b = a if within else np.ascontiguousarray(other, dtype=np.uint64)

    if confirm is not None:
        a2 = np.ascontiguousarray(confirm[0], dtype=np.uint64)
        b2 = a2 if within else np.ascontiguousarray(confirm[2], dtype=np.uint64)

    def tile(ij: tuple[int, int]) -> np.ndarray:
        i, j = ij
        close = np.bitwise_count(a[i : i + block, None] ^ b[None, j : j + block]) <= threshold
        if confirm is not None:
            close &= np.bitwise_count(a2[i : i + block, None] ^ b2[None, j : j + block]) <= confirm[1]
        ii, jj = np.nonzero(close)
        ii, jj = ii + i, jj + j
        if within:  # tiles on the diagonal hold both (i, j) and (j, i)
            keep = jj > ii
            ii, jj = ii[keep], jj[keep]
        return np.stack([ii, jj], axis=1).astype(np.int64)

    def row(i: int) -> np.ndarray:  # one task per row of tiles: a task per tile held thousands of
        # futures and arrays at once (about 7 MB at 50,000 hashes)
        found = [p for p in (tile((i, j)) for j in range(i if within else 0, len(b), block)) if len(p)]
        return np.concatenate([np.zeros((0, 2), np.int64), *found])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = [p for p in pool.map(row, range(0, len(a), block)) if len(p)]
    return np.concatenate([np.zeros((0, 2), np.int64), *parts])


def nearest_hamming(hashes: np.ndarray, cells: int = 1 << 18) -> np.ndarray:
    """For each 64-bit hash, the Hamming distance to the nearest other one (64 when alone); rows are
    compared in blocks of about `cells` distances (9 bytes each), whatever the number of images."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    nearest = np.full(len(h), 64)
    block = max(1, cells // max(1, len(h)))
    for start in range(0, len(h), block):
        d = np.bitwise_count(h[start : start + block, None] ^ h[None, :])  # uint8
        d[np.arange(len(d)), start + np.arange(len(d))] = 64  # not itself
        nearest[start : start + block] = d.min(1)
    return nearest


def equal_pairs(keys) -> np.ndarray:
    """Index pairs that share a key (each member linked to the first of its key)."""
    if not isinstance(keys, (pd.Series, pd.Index, np.ndarray)):
        keys = pd.Series(list(keys), dtype=object)
    codes = pd.factorize(keys)[0]  # per key, one code (no per-key objects: 50,000 keys, 2 MB)
    uniq, first_at = np.unique(codes, return_index=True)
    first = first_at[np.searchsorted(uniq, codes)]
    idx = np.arange(len(codes))
    mask = (first != idx) & (codes >= 0)  # a missing key (code -1) links nothing
    return np.stack([first[mask], idx[mask]], axis=1)


def dhash_pairs(a: pd.DataFrame, dhash_threshold: int, phash_threshold: int, b: pd.DataFrame | None = None):
    """dHash pairs confirmed by pHash within twice its threshold (see the module notes)."""
    return hamming_pairs(a["dhash"].to_numpy(np.uint64), dhash_threshold,
                         None if b is None else b["dhash"].to_numpy(np.uint64),
                         confirm=(a["phash"].to_numpy(np.uint64), 2 * phash_threshold,
                                  None if b is None else b["phash"].to_numpy(np.uint64)))


def find_pairs(df: pd.DataFrame, phash_threshold: int, dhash_threshold: int) -> dict[str, np.ndarray]:
    """Linked index pairs per detector; df needs sha256, pixels, name_key, phash and dhash columns."""
    return {
        "sha256": equal_pairs(df["sha256"]),
        "pixels": equal_pairs(df["pixels"]),
        "name": equal_pairs(df["name_key"]),
        "phash": hamming_pairs(df["phash"].to_numpy(np.uint64), phash_threshold),
        "dhash": dhash_pairs(df, dhash_threshold, phash_threshold),
    }


def group_ids(n: int, pairs: dict[str, np.ndarray] | list[np.ndarray]) -> np.ndarray:
    """Duplicate-group id for each of n items: connected components over all pairs."""
    arrays = list(pairs.values()) if isinstance(pairs, dict) else list(pairs)
    p = np.concatenate([a for a in arrays if len(a)] or [np.zeros((0, 2), np.int64)])
    graph = coo_matrix((np.ones(len(p)), (p[:, 0], p[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def split_groups(labels, groups, *, val_ratio: float, test_ratio: float, seed: int) -> np.ndarray:
    """Stratified group split into train/val/test: a group never crosses splits.

    Groups carry the label of their first member for stratification. Raises DataError when a
    class has fewer groups than splits.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if not (0 < val_ratio < 1 and 0 < test_ratio < 1 and val_ratio + test_ratio < 1):
        raise DataError(f"val_ratio={val_ratio} and test_ratio={test_ratio} must be in (0, 1) with a sum below 1")
    per_class = pd.DataFrame({"label": labels, "group": groups}).groupby("label")["group"].nunique()
    too_few = per_class[per_class < len(SPLITS)]
    if len(too_few):
        raise DataError(
            "too few distinct images to split: "
            + ", ".join(f"class {c!r} has {n} group(s)" for c, n in too_few.items())
            + f" (each class needs at least {len(SPLITS)}, one per split)"
        )
    split = np.full(len(labels), "train", dtype=object)
    # test first, then validation from what is left
    rest = np.arange(len(labels))
    for name, share in (("test", test_ratio), ("val", val_ratio / (1 - test_ratio))):
        held = rest[_hold_out(labels[rest], groups[rest], share, seed)]
        split[held] = name
        rest = np.setdiff1d(rest, held)
    return split


def _hold_out(labels: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Positions of one stratified group fold holding about `share` of the items.

    The fold count approximates the share (1/share folds, at least 2, at most one per group, and
    at most the size of the largest class, which stratification needs): on small data the
    held-out share is then larger than asked.
    """
    labels = pd.factorize(labels, sort=True)[0]  # integer codes in sorted class order: the same folds
    largest = int(np.bincount(labels).max())
    n_folds = max(2, min(int(round(1 / share)), len(np.unique(groups)), largest))
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return next(sgkf.split(labels, labels, groups))[1]


def cross_split_matches(df: pd.DataFrame, phash_threshold: int, dhash_threshold: int) -> pd.DataFrame:
    """Files in different splits that a detector calls the same image, checked afresh per split pair.

    Independent of how the groups were built: exact keys are intersected between splits and
    perceptual hashes compared across them. The result must be empty.
    """
    rows = []
    cols = ["path", "sha256", "pixels", "name_key", "phash", "dhash"]
    for a_name, b_name in [("train", "val"), ("train", "test"), ("val", "test")]:
        a, b = df.loc[df["split"] == a_name, cols], df.loc[df["split"] == b_name, cols]
        for det, col in (("sha256", "sha256"), ("pixels", "pixels"), ("name", "name_key")):
            hit = a.loc[a[col].isin(b[col]), [col, "path"]]  # a hash lookup: no set of every key
            if len(hit):
                same = hit.merge(b.loc[b[col].isin(hit[col]), [col, "path"]], on=col, suffixes=("_a", "_b"))
                rows += [{"detector": det, "split_a": a_name, "file_a": fa, "split_b": b_name, "file_b": fb}
                         for fa, fb in zip(same["path_a"], same["path_b"])]
        near = {"phash": hamming_pairs(a["phash"].to_numpy(np.uint64), phash_threshold, b["phash"].to_numpy(np.uint64)),
                "dhash": dhash_pairs(a, dhash_threshold, phash_threshold, b)}
        for det, hp in near.items():
            for i, j in hp:
                rows.append({"detector": det, "split_a": a_name, "file_a": a["path"].iat[i],
                             "split_b": b_name, "file_b": b["path"].iat[j]})
    return pd.DataFrame(rows, columns=["detector", "split_a", "file_a", "split_b", "file_b"])


def overlap_table(matches: pd.DataFrame) -> pd.DataFrame:
    """Count of cross-split matches per detector and split pair (all zeros when clean)."""
    cols = ["train-val", "train-test", "val-test"]
    table = pd.DataFrame(0, index=list(DETECTORS), columns=cols)
    for (det, a, b), n in matches.groupby(["detector", "split_a", "split_b"]).size().items():
        table.loc[det, f"{a}-{b}"] = n
    table.index.name = "detector"
    return table


class LeakageError(RuntimeError):
    """Files in different splits are the same image; the message lists them."""


_ORDER = {s: i for i, s in enumerate(SPLITS)}


def drop_leaks(df: pd.DataFrame, matches: pd.DataFrame) -> pd.DataFrame:
    """Rows to drop so no image repeats across splits: of each matched pair, the file in the
    later split (train < val < test) goes, so training keeps its copy."""
    later = [(b if _ORDER[sb] > _ORDER[sa] else a)
             for a, sa, b, sb in matches[["file_a", "split_a", "file_b", "split_b"]].itertuples(index=False)]
    return df[df["path"].isin(set(later))]


def carve(df: pd.DataFrame, name: str, ratio: float, seed: int) -> np.ndarray:
    """Splits with a `name` part ("val" or "test") carved out of `train` by duplicate group and
    stratified by class (for pre-split data that comes without that folder)."""
    split = df["split"].to_numpy(dtype=object).copy()
    train = np.flatnonzero(split == "train")
    split[train[_hold_out(df["class"].to_numpy()[train], df["group"].to_numpy()[train], ratio, seed)]] = name
    return split


# --- the audit and the split, as the leakage-audit notebook and cross-validation use them ------


INVENTORY_COLUMNS = ["path", "class", "given_split", "readable", "width", "height"]  # what the audit and split.csv use


def read_inventory(path) -> pd.DataFrame:
    """The EDA inventory's columns that the audit needs (the others, a dozen per file, are not read:
    at 50,000 files they would hold about 10 MB of strings through the whole audit)."""
    return pd.read_csv(path, usecols=INVENTORY_COLUMNS, dtype={"class": "category", "given_split": "category"})


def audit(files: pd.DataFrame, phash_threshold: int, dhash_threshold: int, workers: int = 2
          ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Fingerprint readable files (rows with path and class), link duplicates with every detector
    and group them: returns (files with sha256, pixels, phash, dhash, name_key (integer codes: see
    `name_key_codes`), name_numbered and group columns, linked index pairs per detector)."""
    df = files.reset_index(drop=True)
    df = pd.concat([df, fingerprints(df["path"], workers=workers)], axis=1)
    df["name_key"], df["name_numbered"] = name_key_codes(df["path"], df["class"])
    pairs = find_pairs(df, phash_threshold, dhash_threshold)
    df["group"] = group_ids(len(df), pairs)
    return df, pairs


def representatives(df: pd.DataFrame) -> np.ndarray:
    """Per duplicate group, the file whose name carries no copy or augmentation suffix (the
    original), else the first file by path: a boolean mask over df (which needs path, name_key, group)."""
    from pathlib import Path

    copy = np.array([Path(p).stem.lower() != k.split("/", 1)[1] for p, k in zip(df["path"], _key_strings(df))])
    order = df.assign(_copy=copy).sort_values(["group", "_copy", "path"])
    mask = np.zeros(len(df), bool)
    mask[df.index.get_indexer(order.drop_duplicates("group").index)] = True
    return mask


def pair_counts(df: pd.DataFrame, pairs: dict[str, np.ndarray], dhash_threshold: int) -> pd.DataFrame:
    """Linked pairs per detector, and how many dHash alone would have linked without pHash's confirmation."""
    found = pd.DataFrame({"detector": list(pairs), "linked pairs": [len(p) for p in pairs.values()]})
    alone = hamming_pairs(df["dhash"].to_numpy(np.uint64), dhash_threshold)
    found.loc[len(found)] = ["dhash alone (not used: no pHash confirmation)", len(alone)]
    return found


def group_sizes(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """How many groups hold how many files, and a few numbers about them."""
    sizes = df.groupby("group").size()
    table = sizes.value_counts().sort_index().rename_axis("files in group").rename("groups").to_frame().T
    return table, {"groups": int(df["group"].nunique()), "files": len(df), "shared": int((sizes > 1).sum()),
                   "largest": int(sizes.max())}


def split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Files per class and split, with the test share."""
    table = pd.crosstab(df["class"], df["split"]).reindex(columns=list(SPLITS)).fillna(0).astype(int)
    table.loc["all"] = table.sum()
    table["test share"] = (table["test"] / table.sum(axis=1)).round(3)
    return table


def save_split(result: "SplitResult", folder, chunk: int = 4096) -> None:
    """split.csv (path, class, split, group, the hashes as hex, size) and conflicts.csv into folder.

    Rows are formatted and written a chunk at a time: hex copies of every file's hashes would
    otherwise be the audit's largest allocation (over 10 MB at 50,000 files)."""
    from pathlib import Path

    cols = ["path", "class", "split", "group", "sha256", "pixels", "phash", "dhash", "name_key", "width", "height"]
    with open(Path(folder) / "split.csv", "w", newline="", encoding="utf-8") as f:
        for start in range(0, max(len(result.df), 1), chunk):
            part = result.df.iloc[start:start + chunk]
            out = part[cols].copy()
            for col in ("phash", "dhash"):
                out[col] = [f"{int(v):016x}" for v in out[col]]
            for col in ("sha256", "pixels"):
                out[col] = [v.hex() for v in out[col]]
            out["name_key"] = _key_strings(part)
            out.to_csv(f, index=False, header=start == 0)
    result.conflicts.reindex(columns=["path", "class", "group"]).to_csv(Path(folder) / "conflicts.csv", index=False)


def label_conflicts(df: pd.DataFrame) -> pd.DataFrame:
    """Files of duplicate groups that carry more than one class: one image, several labels."""
    return df[df.groupby("group")["class"].transform("nunique").to_numpy() > 1]


@dataclass
class SplitResult:
    """What `make_split` decided: the kept files with their split, and everything it left out or changed."""

    df: pd.DataFrame  # kept files with a `split` column
    presplit: bool  # the data came split into folders
    conflicts: pd.DataFrame  # files left out: their duplicate group carries several classes
    leaks: pd.DataFrame  # pre-split: cross-split matches in the given split, before on_leak
    dropped: pd.DataFrame  # pre-split, on_leak drop: files removed so no image repeats across splits
    carved: list[str] = field(default_factory=list)  # splits carved out of train ("test", "val")
    remaining: pd.DataFrame = field(default_factory=pd.DataFrame)  # cross-split matches after all (re-checked)


def make_split(df: pd.DataFrame, *, val_ratio: float, test_ratio: float, seed: int, on_leak: str,
               phash_threshold: int, dhash_threshold: int) -> SplitResult:
    """The train / val / test split of audited files (from `audit`, with given_split).

    - Duplicate groups carrying several classes (the same image filed under two classes) are
      left out and returned as `conflicts`.
    - Unsplit data: a stratified split by duplicate group.
    - Pre-split data: the given split is kept; images shared across splits are handled by
      `on_leak` (fail later in `check`, drop the copies outside train, or report); a missing
      test, then validation, split is carved out of train by duplicate group.
    - Every class must keep at least one training image (DataError names it).
    Then every split pair is re-checked by every detector (`remaining`; see `check`).
    """
    if on_leak not in ("fail", "drop", "report"):
        raise ValueError(f"on_leak must be fail, drop or report, got {on_leak!r}")
    conflicts = label_conflicts(df)
    keep = ~df.index.isin(conflicts.index)
    presplit = bool(df.loc[keep, "given_split"].notna().any())
    empty = pd.DataFrame(columns=["detector", "split_a", "file_a", "split_b", "file_b"])
    if not presplit:  # split first: the table's copy then never meets the split's own working memory
        split = split_groups(df["class"].to_numpy()[keep], df["group"].to_numpy()[keep], val_ratio=val_ratio,
                             test_ratio=test_ratio, seed=seed)
    df = (df[keep] if len(conflicts) else df).reset_index(drop=True)  # no copy without conflicts
    leaks, dropped, carved = empty, df.iloc[:0], []
    if not presplit:
        df = df.assign(split=split)
    else:
        df = df.assign(split=df["given_split"].astype(object))  # plain labels, as in the unsplit case
        leaks = cross_split_matches(df, phash_threshold, dhash_threshold)
        if on_leak == "drop" and len(leaks):
            dropped = drop_leaks(df, leaks)
            df = df[~df["path"].isin(dropped["path"])].reset_index(drop=True)
        for name, ratio in (("test", test_ratio), ("val", val_ratio)):
            if name not in set(df["split"]):
                df["split"] = carve(df, name, ratio, seed)
                carved.append(name)
    no_train = sorted(set(df["class"]) - set(df.loc[df["split"] == "train", "class"]))
    if no_train:
        raise DataError(f"class(es) {no_train} have no training images after the split"
                        + (" (their train/ folders are empty or missing, or too few distinct images to carve "
                           "validation and test splits from them)" if presplit else "")
                        + ": add images, or remove the class from `classes`")
    remaining = cross_split_matches(df, phash_threshold, dhash_threshold)
    return SplitResult(df=df, presplit=presplit, conflicts=conflicts, leaks=leaks, dropped=dropped, carved=carved,
                       remaining=remaining)


def check(result: SplitResult, on_leak: str) -> None:
    """Raise LeakageError listing the files when images still repeat across splits, unless the
    data came split and on_leak is report (the report then says the scores are inflated)."""
    m = result.remaining
    if len(m) and not (result.presplit and on_leak == "report"):
        raise LeakageError(
            f"{len(m)} cross-split matches remain (on_leak: {on_leak}); offending files:\n"
            + "\n".join(f"  [{r.detector}] {r.file_a} ({r.split_a}) <-> {r.file_b} ({r.split_b})"
                        for r in m.itertuples())
            + "\nSet on_leak: drop to remove the copies outside train, or fix the folders.")
