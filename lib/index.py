"""reports/index.html: links to the five stage reports and the run's headline figures.

    python -m lib.index --build build --reports reports
"""

from __future__ import annotations

import argparse
import html
import sys
from datetime import datetime, timezone
from pathlib import Path

import nbformat

from lib.io import claim, read_json, write_text_atomic

STAGES = [
    ("01_eda", "Dataset inventory: images per class, samples, sizes/modes, intensity per class, unreadable files"),
    ("02_leakage_audit", "Duplicate detectors, duplicate groups, the grouped stratified split, zero-overlap proof"),
    ("03_training", "Weights used, augmentation, training curves, best epoch"),
    ("04_evaluation", "Per-class recall/precision/F1, confusion matrices, miss and false-alarm rates, errors"),
    ("05_export", "ONNX graph, checker, parity with PyTorch, INT8 settings compared, INT8 vs FP32, latency "
                  "(PyTorch, ONNX Runtime FP32 / INT8), size, the deployment bundle"),
]


def _json(path: Path) -> dict:
    try:
        record = read_json(path) if path.is_file() else {}
    except ValueError:  # an older, empty stamp
        return {}
    return record if isinstance(record, dict) else {}


def stage_figures(executed: Path) -> tuple[float | None, float | None]:
    """Wall time papermill recorded for an executed notebook, and its kernel's peak memory (MiB)."""
    if not executed.is_file():
        return None, None
    meta = nbformat.read(str(executed), as_version=4).metadata
    return meta.get("papermill", {}).get("duration"), meta.get("sem_defects", {}).get("kernel_peak_rss_mib")


def headline(build: Path) -> dict:
    m = _json(build / "eval" / "metrics.json")
    e = _json(build / "export" / "export.json")
    t = _json(build / "train" / "summary.json")
    d = _json(build / "dataset.json")
    return {
        "dataset": ("your images in " + d["root"] if d.get("root") and not d.get("synthetic")
                    else f"embedded synthetic dataset ({d['root']})" if d.get("root") else None),
        "test images": m.get("test_images"),
        "test accuracy [95% bootstrap interval]": _interval(m, "accuracy", "accuracy"),
        "macro recall [95%]": _interval(m, "macro recall", "macro_recall"),
        "miss rate (defect → clean) [95%]": _interval(m, "miss rate", "miss_rate"),
        "false-alarm rate (clean → defect) [95%]": _interval(m, "false-alarm rate", "false_alarm_rate"),
        "calibration: temperature / test ECE before → after": (
            f"{m['temperature']:.2f} / {m['ece']['before']['test']:.3f} → {m['ece']['after']['test']:.3f}"
            if "temperature" in m else None),
        "operating point: review threshold / test coverage / accuracy and miss rate of the auto-classified": (
            _operating_point(m["review_threshold"], m["operating_point"]["test"]) if "operating_point" in m else None),
        "weights": t.get("weights", {}).get("detail"),
        "best epoch / epochs run": f"{t.get('best_epoch')} / {t.get('epochs_run')}" if t else None,
        "ONNX size (MB)": e.get("bytes", 0) / 1e6 if e else None,
        "ONNX Runtime batch-1 latency p50 (ms)": e.get("latency_batch1", {}).get("p50_ms"),
        "ONNX parity (argmax agreement)": e.get("parity", {}).get("argmax_agreement"),
        "INT8 size (MB)": e["int8"]["bytes"] / 1e6 if e.get("int8") else None,
        "ONNX Runtime INT8 batch-1 latency p50 (ms)": next((r["p50_ms"] for r in e.get("latency", [])
                                                            if r["engine"] == "ONNX Runtime INT8" and r["batch"] == 1), None),
        "INT8 fit for use (recall-first gate, validation)": e["int8"]["fit"] if e.get("int8") else None,
        "INT8 vs FP32, validation: macro-recall drop / miss-rate rise (points)": _pair(e.get("int8"), "macro_recall_drop",
                                                                                        "miss_rate_rise"),
        "INT8 vs FP32, test: macro-recall drop / miss-rate rise (points)": _pair(e.get("int8"), "test_macro_recall_drop",
                                                                                  "test_miss_rate_rise"),
        "CPU": e.get("machine", {}).get("cpu"),
    }


def _interval(m: dict, figure: str, key: str) -> str | float | None:
    """A test figure with its bootstrap interval, rounded to what the test split supports."""
    from lib.calibration import fmt

    row = next((r for r in m.get("intervals", []) if r["figure"] == figure), None)
    if row is None:
        return m.get(key)
    if row["value"] is None:
        return None
    return fmt(row["value"], row["low"], row["high"], m.get("test_images", 0))


def _operating_point(threshold: float, t: dict) -> str:
    acc = "n/a" if t["auto_accuracy"] is None else f"{t['auto_accuracy']:.3f}"
    miss = "" if t.get("auto_miss_rate") is None else f", miss rate {t['auto_miss_rate']:.3f}"
    return f"{threshold:.3f} / {t['coverage']:.2f} ({t['auto']} of {t['images']}) / accuracy {acc}{miss}"


def _pair(record: dict | None, a: str, b: str) -> str | None:
    if not record:
        return None
    return " / ".join("n/a" if record.get(k) is None else f"{100 * record[k]:+.2f}" for k in (a, b))


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.1f}"
    return html.escape(str(v))


def _tenths(v) -> str:
    return "–" if v is None else f"{float(v):.1f}"


def build_index(build: Path, reports: Path, venv: Path | None = None) -> Path:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in headline(build).items())
    stage_rows = []
    total = 0.0
    env = _json(venv / ".ready") if venv is not None else {}
    render = _json(build / "dataset.json").get("render_seconds")
    for label, secs in (("environment (creating .venv; once per clone)", env.get("seconds")),
                        ("rendering the embedded dataset (when it changes)", render)):
        stage_rows.append(f"<tr><td>{html.escape(label)}</td><td></td><td>{_tenths(secs)}</td><td>–</td></tr>")
    for name, what in STAGES:
        secs, rss = stage_figures(build / "notebooks" / f"{name}.ipynb")
        total += secs or 0
        stage_rows.append(f"<tr><td><a href='{name}.html'>{name}</a></td><td>{html.escape(what)}</td>"
                          f"<td>{_tenths(secs)}</td><td>{_tenths(rss)}</td></tr>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SEM defect classification: reports</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
th{{background:#f4f4f4}}</style></head><body>
<h1>SEM defect classification: reports</h1>
<p>Rendered {stamp} from <code>{html.escape(str(build))}</code>.</p>
<h2>Headline figures (test split)</h2><table>{rows}</table>
<h2>Stages</h2><table><tr><th>report</th><th>contents</th><th>wall time (s)</th><th>peak memory (MiB)</th></tr>{''.join(stage_rows)}
<tr><th colspan=2>all notebooks</th><th>{total:.1f}</th><th></th></tr></table>
</body></html>
"""
    claim(reports, "reports folder")
    return write_text_atomic(reports / "index.html", page)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write reports/index.html.")
    ap.add_argument("--build", default="build")
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--venv", default=None, help="the environment folder, whose .ready records its creation time")
    args = ap.parse_args(argv)
    from lib.io import OwnershipError

    try:
        print(build_index(Path(args.build), Path(args.reports), Path(args.venv) if args.venv else None))
    except OwnershipError as e:
        print(f"error: {e} (REPORTS=...)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
