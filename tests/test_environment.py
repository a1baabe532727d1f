"""The environment: the pip path (requirements.txt) and the conda path (environment.yml) install the same
pins, the Makefile runs every stage under the same malloc settings, and `make test` splits the suite
between its workers without running an expensive fixture twice."""

import json
import os
import re
import subprocess
import sys

import yaml

from conftest import ROOT


def requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^\s;]*)", line)
            assert m, f"requirements.txt: {line!r} is not pinned as name==version"
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_every_requirement_is_pinned_and_torch_pins_are_the_cached_ones():
    pins = requirements()
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    for needed in ("papermill", "nbconvert", "jupyterlab", "onnx", "onnxruntime", "scikit-learn", "imagehash"):
        assert needed in pins


def test_environment_yml_installs_exactly_requirements_txt_on_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip_section == ["-r requirements.txt", "-e ."], "environment.yml must install requirements.txt and lib"
    # any conda package other than python/pip would be a second, unchecked source of versions
    assert [d for d in deps if isinstance(d, str)] == ["python=3.11", "pip"]


def test_makefile_builds_the_venv_from_requirements_txt():
    make = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -r requirements.txt" in make
    assert "PYTHON  ?= python3.11" in make


def _seen_by_make(names: list[str], **env: str) -> list[str]:
    """What a Makefile recipe sees for each environment variable in names, started with no MALLOC_ variable
    set (make test itself runs under the Makefile's) plus env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    probe = "probe:;@" + "".join(f'echo "$${n}";' for n in names)
    out = subprocess.run(["make", "-s", "--eval", probe, "probe"], cwd=ROOT, text=True, capture_output=True,
                         check=True, env={**clean, **env})
    return out.stdout.splitlines()


def test_make_keeps_the_malloc_heap_for_every_stage_and_the_environment_wins():
    mmap_max, trim = _seen_by_make(["MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"])
    assert mmap_max == "0" and int(trim) >= 2**32  # no block mmapped, none trimmed back to the kernel
    assert _seen_by_make(["MALLOC_MMAP_MAX_"], MALLOC_MMAP_MAX_="65536") == ["65536"]


GROUP_DUMP = '''
import json

def pytest_collection_finish(session):
    rows = []
    for item in session.items:
        defs = item._fixtureinfo.name2fixturedefs
        shared = [n for n in item.fixturenames if n in defs and defs[n][-1].scope in ("module", "session")]
        callspec = getattr(item, "callspec", None)
        if callspec is not None and isinstance(callspec.params.get("route"), str):
            shared.append(callspec.params["route"])  # the route fixture asks for it by name
        rows.append({"id": item.nodeid, "shared": shared})
    print("COLLECTED " + json.dumps(rows))
'''


def test_make_test_runs_two_workers_and_each_shared_fixture_is_set_up_by_one(tmp_path):
    """`make test` hands each pytest-xdist worker whole groups of tests (conftest.xdist_group, read off a test's
    id). A module- or session-scoped fixture whose tests sat in two groups could run on both workers: a second
    own-data or smoke route, minutes."""
    from conftest import SLOW_GROUPS, xdist_group

    assert "$(PY) -m pytest -n $(TEST_WORKERS)\n" in (ROOT / "Makefile").read_text()
    assert "pytest-xdist" in requirements()
    (tmp_path / "collected_dump.py").write_text(GROUP_DUMP)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "collected_dump", "-p",
                          "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("COLLECTED "))[10:])
    assert len(rows) > 300
    cheap = {"lite0_bundle", "tmp_path_factory"}  # an export of seconds: a second one costs less than a group
    where = {}
    for r in rows:
        for name in set(r["shared"]) - cheap:
            where.setdefault(name, set()).add(xdist_group(r["id"]))
    assert {"smoke_run", "presplit_example", "unsplit_default", "presplit_no_test", "cv_run"} <= where.keys()
    assert {name: groups for name, groups in where.items() if len(groups) > 1} == {}
    order = [xdist_group(r["id"]) for r in rows]  # as collected: the slowest groups first, each in one run
    firsts = list(dict.fromkeys(order))
    assert firsts[:len(SLOW_GROUPS)] == SLOW_GROUPS
    assert sum(a != b for a, b in zip(order, order[1:])) == len(firsts) - 1  # each group in one run
