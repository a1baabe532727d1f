"""Arrays on disk, so that memory does not grow with the number of images.

- `gray_images`: the decoded-image cache. Every image of a list is decoded once by the one
  preprocessing (`lib.preprocess.load_gray`) into one `.npy` file of uint16 [N, 1, size, size]
  under a cache folder, named by a key over each file's fingerprint (resolved path, size,
  modification time) and the preprocessing (size, resize policy, alpha background and the
  preprocessing code). Every stage and process that asks for the same images with the same
  preprocessing reads the same file; a changed file or changed preprocessing gives a new key.
  uint16 rather than uint8: 16-bit SEM files keep their depth, and a cached image equals what
  `lib.predict` computes from the file to within 1 / 65535.
- `write`: any array given in chunks along its first axis, written atomically as one `.npy`
  (the training's trunk activations, `lib.recipes.trunk_views`).
- `DiskArray`: a read-only `.npy` file read by rows: `a[i]`, `a[i:j]`, `a[mask]`, `a[indices]`,
  `a[:, 0]` give in-memory numpy copies of just those rows; `np.asarray(a)` reads all of it.

The files are ordinary `.npy` files (`np.load(path, mmap_mode="r")` maps one). The project reads
rows by offset (`os.preadv`) instead of through one long-lived mapping: the pages of a mapping a
pass has touched count as the process's resident memory until it is unmapped, so one pass over a
50,000-image cache would show gigabytes of it. Read this way, they stay in the kernel's page cache,
shared by all processes and given back under memory pressure.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the layout of a cache file changes
GRAY_SCALE = 65535.0  # uint16 levels of the 0-1 grayscale range
CHUNK = 512  # images decoded and written per step (about 50 MB of float32 at 160 px)
KEEP_DAYS = 7  # a cached decoding unused this long is removed when a new one is written


class DiskArray:
    """A read-only `.npy` array on disk, read by rows on demand.

    Indexing along the first axis (an int, a slice, a boolean mask or an index array, optionally
    followed by indices of the other axes) returns an in-memory numpy copy; with `scale`, stored
    integers come back as float32 divided by it (uint16 images -> 0-1). Safe across fork and pickle.
    """

    def __init__(self, path: str | Path, *, scale: float | None = None):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, stored = read(f)
            self._offset = f.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path}: not a C-ordered array with a first axis")
        self.shape, self._stored, self._scale = tuple(shape), np.dtype(stored), scale
        self.dtype = np.dtype(np.float32) if scale else self._stored
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self._stored.itemsize
        expected = self._offset + self.shape[0] * self._row_bytes
        if os.path.getsize(self.path) != expected:
            raise ValueError(f"{self.path}: {os.path.getsize(self.path)} bytes where its header promises {expected} "
                             f"(a truncated or foreign file: delete it and rerun)")
        self._fd, self._pid = None, None

    ndim = property(lambda self: len(self.shape))
    nbytes = property(lambda self: self.shape[0] * self._row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={self.shape}, stored={self._stored})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, out: np.ndarray, offset: int) -> np.ndarray:
        """Fill the C-contiguous array `out` from the file's bytes at `offset` past the header."""
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(view):
            n = os.preadv(self._file(), [view[done:]], self._offset + offset + done)
            if n == 0:
                raise ValueError(f"{self.path}: ends before its last row (truncated: delete it and rerun)")
            done += n
        return out

    def _rows(self, start: int, count: int) -> np.ndarray:
        return self._read(np.empty((count, *self.shape[1:]), self._stored), start * self._row_bytes)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self._stored)
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        for run in np.split(np.arange(len(idx)), np.flatnonzero(np.diff(ordered) != 1) + 1):
            if len(run):  # consecutive rows are read in one call
                out[order[run]] = self._rows(int(ordered[run[0]]), len(run))
        return out

    def _block(self, ints: tuple) -> np.ndarray:
        """a[i, j, ...] for leading integer indices: only that block is read."""
        flat = 0
        for axis, i in enumerate(ints):
            i = operator.index(i)
            if not -self.shape[axis] <= i < self.shape[axis]:
                raise IndexError(f"index {i} is out of bounds for axis {axis} of size {self.shape[axis]} in {self.path}")
            flat = flat * self.shape[axis] + i % self.shape[axis]
        inner = self.shape[len(ints):]
        out = self._read(np.empty(inner, self._stored), flat * int(np.prod(inner, dtype=np.int64)) * self._stored.itemsize)
        return np.divide(out, self._scale, dtype=np.float32) if self._scale else out

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            if 1 < len(key) <= self.ndim and all(isinstance(k, (int, np.integer)) for k in key):
                return self._block(key)
            key, rest = (key[0] if key else slice(None)), key[1:]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = operator.index(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} rows of {self.path}")
            out = self._rows(i % n, 1)[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(n)
            out = self._rows(start, max(0, stop - start)) if step == 1 else self._take(np.arange(start, stop, step))
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index of shape {idx.shape} for {n} rows of {self.path}")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if len(idx) and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"index out of bounds for {n} rows of {self.path}")
            out = self._take(idx % n if n else idx)
        if self._scale:
            out = np.divide(out, self._scale, dtype=np.float32)
        if rest:
            out = out[rest] if isinstance(key, (int, np.integer)) else out[(slice(None), *rest)]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def write(path: str | Path, shape: tuple, dtype, chunks) -> Path:
    """Write `chunks` (arrays along the first axis, in order, together `shape`) as one `.npy` file,
    atomically: the file appears complete or not at all. Memory holds one chunk at a time."""
    from lib.io import atomic_path

    path, dtype, shape = Path(path), np.dtype(dtype), tuple(int(s) for s in shape)
    rows = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": shape})
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != shape[1:]:
                    raise ValueError(f"{path}: a chunk of shape {chunk.shape} for an array of shape {shape}")
                f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                rows += len(chunk)
            if rows != shape[0]:
                raise ValueError(f"{path}: {rows} rows written for an array of {shape[0]}")
            f.flush()
            os.fsync(f.fileno())
    return path


def prune(folder: Path, keep_days: float = KEEP_DAYS) -> list[Path]:
    """Remove the cached decodings (`gray*.npy`) under folder that no stage has used for keep_days:
    those of files since changed, or of preprocessing no longer asked for. Returns what it removed."""
    import time

    old = [p for p in folder.glob("gray*.npy") if time.time() - p.stat().st_mtime > keep_days * 86400]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def preprocessing_code() -> str:
    """SHA-256 of `lib/preprocess.py`: a cache made by other preprocessing code is not reused."""
    return hashlib.sha256((Path(__file__).parent / "preprocess.py").read_bytes()).hexdigest()[:16]


def gray_key(paths, size: int, resize: str, background: float) -> str:
    """The cache key of decoding `paths` at this preprocessing: each file's resolved path, size and
    modification time, the preprocessing settings and code, and the cache format."""
    files = []
    for p in paths:
        st = os.stat(p)
        files.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    text = json.dumps({"format": FORMAT, "code": preprocessing_code(), "size": int(size), "resize": resize,
                       "background": float(background), "files": files})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load_u16(path: str, size: int, resize: str, background: float) -> np.ndarray:
    from lib.preprocess import load_gray

    return np.round(load_gray(path, size, resize=resize, background=background) * GRAY_SCALE).astype(np.uint16)


def gray_images(paths, size: int, cache_dir: str | Path, *, resize: str = "stretch", background: float = 0.0,
                workers: int = 2, log=None) -> DiskArray:
    """`paths` decoded once into the cache under `cache_dir` (a folder the project owns, created
    when missing): float32 [N, 1, size, size] on 0-1 on reading. Reused while no file and no
    preprocessing setting or code changed; decoding holds CHUNK images in memory at a time.
    Writing a new one first removes those unused for KEEP_DAYS (`prune`)."""
    import time

    from lib.io import claim

    paths = [str(p) for p in paths]
    folder = claim(cache_dir, "decoded-image cache")
    target = folder / f"gray{size}_{resize}_{gray_key(paths, size, resize, background)}.npy"
    if target.is_file():
        os.utime(target)  # its modification time records its last use
    else:
        prune(folder)
        t0 = time.perf_counter()
        load = partial(_load_u16, size=size, resize=resize, background=background)
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            chunks = (np.stack(list(pool.map(load, paths[i : i + CHUNK], chunksize=16)))[:, None]
                      for i in range(0, len(paths), CHUNK))
            write(target, (len(paths), 1, size, size), np.uint16, chunks)
        if log:
            log(f"decoded {len(paths)} images at {size} px into {target} in {time.perf_counter() - t0:.1f} s")
    return DiskArray(target, scale=GRAY_SCALE)
