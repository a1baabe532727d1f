"""Safe writes: atomic files, strict JSON, and folders the project owns.

- Atomic files: a reader never sees a half-written artifact, and a failed write keeps the old one.
- Strict JSON: every JSON file parses with a strict parser (no NaN or Infinity; null where a value
  does not exist).
- Ownership: the project writes, renames or deletes only inside folders it created. A folder it
  creates carries a marker file (`MARKER`); a folder is taken over only when it is missing or empty.
  Anything else stops with `OwnershipError`, naming the folder and the fix. Whole-folder artifacts
  (the rendered dataset, each stage's outputs) are built in a staging folder and swapped in only
  when complete, so a killed run never leaves a half-written folder that looks finished.

Standard library only, so `python -m lib.io clean ...` runs without the project's environment.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

MARKER = ".sem-defects.json"
OWNER = "sem-defects"
# entries that do not make a folder non-empty (a tracked placeholder)
_PLACEHOLDERS = {".gitkeep"}


_TMP = ".tmp"


def _in_flight(path: Path, name: str) -> bool:
    """Whether `path` is an `atomic_path` temporary file for a file called `name` (being written)."""
    return path.name.startswith(f".{name}.") and path.name.endswith(_TMP)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_TMP, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_bytes_atomic(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_if_changed(target: str | Path, text: str) -> bool:
    """Write only when the content differs, so `make` sees an unchanged timestamp otherwise."""
    target = Path(target)
    if target.is_file() and target.read_text() == text:
        return False
    write_text_atomic(target, text)
    return True


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- strict JSON ---------------------------------------------------------------------------


def plain(obj: Any) -> Any:
    """JSON-safe plain data: NaN, Infinity and missing values become None; numpy scalars and
    arrays become Python numbers and lists; paths become strings; tuples and sets become lists."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__name__ in ("NAType", "NaTType"):  # pandas' missing values
        return None
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalars and arrays
        return plain(obj.tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON data: {obj!r}")


def dumps(obj: Any) -> str:
    """Strict JSON text (indented) of `obj` after `plain`."""
    return json.dumps(plain(obj), indent=2, allow_nan=False) + "\n"


def write_json_atomic(target: str | Path, obj: Any) -> Path:
    """Write `obj` as strict JSON, atomically."""
    return write_text_atomic(target, dumps(obj))


def _refuse_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file strictly (NaN, Infinity and -Infinity are errors)."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)


# --- folders the project owns --------------------------------------------------------------


class OwnershipError(RuntimeError):
    """A folder the project would write into, rename or delete was not created by it."""


def marker(folder: str | Path) -> dict | None:
    """The ownership record of a folder, or None when the project did not create it."""
    f = Path(folder) / MARKER
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("owner") == OWNER else None


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in _PLACEHOLDERS and p.name != MARKER)


def _write_marker(folder: Path, what: str, **extra) -> None:
    record = {"owner": OWNER, "what": what, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **extra}
    write_json_atomic(folder / MARKER, record)


def _describe(entries: list[Path], n: int = 5) -> str:
    shown = ", ".join(p.name for p in entries[:n])
    return shown + (f" and {len(entries) - n} more" if len(entries) > n else "")


# Folders that hold other things of the project's (each marked itself) besides files it names; they are
# emptied of what is the project's, never removed whole.
CONTAINERS = ("build folder", "reports folder", "parent folder")
# Files the project writes directly into a container (everything else it writes there sits in a marked folder).
KNOWN_FILES = {"build folder": ("dataset.json",), "reports folder": ("[0-9][0-9]_*.html", "index.html", "sweep.html"),
               "parent folder": ()}


def make_parents(folder: Path) -> None:
    """Create the missing ancestors of `folder`, marking each one the project creates as its own."""
    missing = [p for p in reversed(folder.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
        _write_marker(p, "parent folder")


def claim(folder: str | Path, what: str) -> Path:
    """Make sure `folder` is the project's: create it (with its marker) when missing, mark it when
    empty, accept it when marked (a parent folder the project made takes the new role); otherwise
    raise OwnershipError naming it and the fix."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{folder} ({what}) exists and is not a folder; choose another path")
    if folder.is_dir():
        record = marker(folder)
        if record is not None:
            if record.get("what") == "parent folder" and what != "parent folder":
                _write_marker(folder, what)
            return folder
        # another process of the project claiming the same new folder (torchrun ranks) may be
        # writing its marker: that temporary file is the project's, not a stranger's
        entries = [p for p in _entries(folder) if not _in_flight(p, MARKER)]
        if entries:
            raise OwnershipError(
                f"{folder} ({what}) already holds files the project did not create ({_describe(entries)}). "
                f"The project writes only into folders it created, or into empty ones: choose a new or empty "
                f"folder for the {what}")
    make_parents(folder)
    folder.mkdir(exist_ok=True)
    _write_marker(folder, what)
    return folder


def foreign_entries(folder: str | Path) -> list[Path]:
    """Files under an owned folder that its marker does not list (someone else put them there).

    Folders whose marker lists no files (build and report folders) have none by definition."""
    record = marker(folder) or {}
    if "files" not in record:
        return []
    known = set(record["files"])
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER
                  and p.relative_to(folder).as_posix() not in known)


def check_replaceable(target: str | Path, what: str) -> None:
    """Raise OwnershipError unless `target` is missing, empty, or the project's own folder holding
    only files the project wrote there."""
    target = Path(target)
    if target.is_symlink():
        raise OwnershipError(f"{target} ({what}) is a symbolic link; the project replaces only folders it "
                             f"created: point the parameter at a real folder")
    if not target.exists():
        return
    if not target.is_dir():
        raise OwnershipError(f"{target} ({what}) exists and is not a folder; choose another path")
    if marker(target) is None:
        entries = _entries(target)
        if entries:
            raise OwnershipError(
                f"{target} ({what}) holds files the project did not create ({_describe(entries)}), so it will "
                f"not write there. Choose a new or empty folder for the {what}; the project never writes into, "
                f"renames or deletes a folder it did not create")
        return
    if marker(target).get("what") != what:
        raise OwnershipError(f"{target} is the project's {marker(target).get('what')}, not a {what}: choose "
                             f"another folder for the {what}")
    foreign = foreign_entries(target)
    if foreign:
        raise OwnershipError(
            f"{target} ({what}) is the project's, but holds files the project did not write "
            f"({_describe([p.relative_to(target) for p in foreign])}); move them out of it, then run again")


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def _sweep(parent: Path, prefix: str) -> None:
    """Remove leftovers of killed runs: hidden staging folders this module made under an owned parent."""
    if marker(parent) is None:
        return
    for p in parent.glob(f".{prefix}.*"):
        if p.is_dir() and (".staging-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def replace_folder(target: str | Path, fill: Callable[[Path], dict | None], what: str) -> dict:
    """Build a whole folder with `fill(staging)` and swap it in at `target` only once complete.

    `target` must be missing, empty, or an earlier folder of this kind (`check_replaceable`).
    The marker written into the new folder lists every file in it, together with what `fill`
    returns. On failure the old folder is untouched and the staging folder is removed.
    Returns the marker record.
    """
    target = Path(target).absolute()
    check_replaceable(target, what)
    make_parents(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        extra = fill(staging) or {}
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        record = {"what": what, "files": _listing(staging), **extra}
        _write_marker(staging, **record)
        if target.is_dir() and marker(target) is None:  # an empty folder someone made: fill it in place
            for p in sorted(staging.iterdir(), key=lambda p: p.name == MARKER):  # the marker last
                os.rename(p, target / p.name)
            staging.rmdir()
        else:
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return marker(target) or {}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def stage_folder(build_dir: str | Path, name: str) -> Path:
    """A fresh staging folder for one stage's outputs, inside the (claimed) build folder.

    Write everything there, then `commit` it: `<build_dir>/<name>` changes only when the stage
    completes, so a killed stage leaves its previous, complete outputs (and never a
    half-written folder under the final name)."""
    build = claim(build_dir, "build folder")
    _sweep(build, name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=build))


def commit(staging: str | Path) -> Path:
    """Swap a folder from `stage_folder` in as `<build_dir>/<name>`; return the final path."""
    staging = Path(staging)
    name = staging.name[1:].rsplit(".staging-", 1)[0]
    target = staging.parent / name

    def move(into: Path) -> None:
        for p in staging.iterdir():
            os.rename(p, into / p.name)

    replace_folder(target, move, f"{name} outputs")
    staging.rmdir()
    return target


def remove_owned(folder: str | Path) -> list[str]:
    """Delete what the project created in and as `folder`; refuse a folder it did not create.

    A folder the project filled whole (its marker lists the files) goes whole, unless someone put
    files of their own in it (then it is refused, naming them). A container (build, reports or a
    parent folder) loses its marked sub-folders (recursively) and the files the project names
    (KNOWN_FILES); anything else in it stays, and so does the container then. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.exists():
        return []
    record = None if folder.is_symlink() else marker(folder)
    if record is None:
        raise OwnershipError(f"{folder} was not created by the project (no {MARKER} in it): not removed")
    if record.get("what") not in CONTAINERS:
        foreign = foreign_entries(folder)
        if foreign:
            raise OwnershipError(f"{folder} holds files the project did not write "
                                 f"({_describe([p.relative_to(folder) for p in foreign])}): not removed")
        shutil.rmtree(folder)
        return [str(folder)]
    removed, kept = [], []
    known = {p for pattern in KNOWN_FILES[record["what"]] for p in folder.glob(pattern) if p.is_file()}
    for entry in _entries(folder):
        if entry.is_dir() and not entry.is_symlink() and marker(entry) is not None:
            try:
                removed += remove_owned(entry)
            except OwnershipError:
                pass
            if entry.exists():
                kept.append(entry)
        elif entry in known:
            entry.unlink()
            removed.append(str(entry))
        else:
            kept.append(entry)
    if not kept and not any(p.name in _PLACEHOLDERS for p in folder.iterdir()):
        (folder / MARKER).unlink()
        folder.rmdir()
        removed.append(str(folder))
    return removed


def clean(build: str | Path | None = None, reports: str | Path | None = None, data: str | Path | None = None) -> list[str]:
    """What `make clean` / `make clean-all` remove: what the project made in the build and reports
    folders, and the project's rendered datasets directly under `data`. Nothing else is touched."""
    removed = []
    for folder in (build, reports):
        if folder is not None:
            removed += remove_owned(folder)
    if data is not None and Path(data).is_dir():
        for sub in sorted(Path(data).iterdir()):
            if sub.is_dir() and not sub.is_symlink() and (marker(sub) or {}).get("what") == "synthetic dataset":
                removed += remove_owned(sub)
    return removed


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Remove what the project generated, and nothing else.")
    ap.add_argument("command", choices=["clean"])
    ap.add_argument("--build", help="build folder: removed when the project created it")
    ap.add_argument("--reports", help="reports folder: the project's report files in it are removed")
    ap.add_argument("--data", help="data folder: the project's rendered datasets directly under it are removed")
    args = ap.parse_args(argv)
    try:
        removed = clean(args.build, args.reports, args.data)
    except OwnershipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in removed:
        print(f"removed {r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
