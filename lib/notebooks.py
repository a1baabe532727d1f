"""Running the notebooks: execute a stage notebook headless with papermill and render it to an HTML
report for readers, the same way every time.

    python -m lib.notebooks notebooks/01_eda.ipynb --params build/params.yaml \
        --executed build/nb/01_eda.ipynb --html reports/01_eda.html

Only the parameters the notebook declares in its `parameters` cell are injected (the
resolved file holds every stage's keys). Outputs are written atomically and only on
success; a failed run leaves `<executed>.failed.ipynb` for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import yaml

from lib.io import atomic_path, claim, write_text_atomic
from lib.params import RESOLVED_ENV, ROOT

KERNEL = "python3"
# Reports show outputs, not code: every input is left out, and these cells vanish whole (the
# parameters cell, papermill's injected one, and plumbing tagged `hide`). The executed notebooks
# under <build_dir>/notebooks keep everything, for those who want the code.
HIDDEN_CELLS = ("parameters", "injected-parameters", "hide")


def declared_parameters(notebook: str | Path) -> list[str]:
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def execute(notebook: str | Path, executed: str | Path, params: dict, *, timeout: int = 3600,
            resolved_file: str | Path | None = None):
    """Run `notebook` with `params` (only the declared ones) into `executed`; return the node.

    `resolved_file`, the run's full resolved parameter file, is named to the kernel
    ($SEM_DEFECTS_PARAMS) so that the notebook records every parameter of the run, not only
    the ones it declares (`lib.params.collect`)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    wanted = set(declared_parameters(notebook))
    inject = {k: v for k, v in params.items() if k in wanted}
    executed = Path(executed)
    failed = executed.with_suffix(".failed.ipynb")
    failed.unlink(missing_ok=True)
    resolved = None if resolved_file is None else str(Path(resolved_file).resolve())
    with atomic_path(executed) as tmp, _environ(RESOLVED_ENV, resolved):
        out = tmp.with_suffix(".ipynb")
        try:
            nb = papermill.execute_notebook(
                str(notebook), str(out), parameters=inject, kernel_name=KERNEL, cwd=str(ROOT),
                execution_timeout=timeout, progress_bar=False, log_output=True,
            )
        except PapermillExecutionError:
            out.replace(failed)
            raise
        finally:
            if out.exists():
                out.replace(tmp)
        nbformat.validate(nb)
        # the kernel is this process's child: its peak resident memory, for the index
        import resource

        nb.metadata["sem_defects"] = {"kernel_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
        nbformat.write(nb, str(tmp))
    return nb


def render_html(executed: str | Path, html: str | Path) -> Path:
    """Executed notebook -> standalone HTML report for readers: images embedded, code and prompts left
    out, the parameter and plumbing cells removed by tag (nbconvert's TagRemovePreprocessor), and
    nothing fetched from the network (lib/report_template: the lab template without CDN scripts)."""
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    cfg = Config()
    cfg.TagRemovePreprocessor.enabled = True
    cfg.TagRemovePreprocessor.remove_cell_tags = set(HIDDEN_CELLS)
    cfg.TemplateExporter.exclude_input = True
    cfg.TemplateExporter.exclude_input_prompt = True
    cfg.TemplateExporter.exclude_output_prompt = True
    cfg.HTMLExporter.extra_template_basedirs = [str(Path(__file__).parent)]
    exporter = HTMLExporter(config=cfg, template_name="report_template")
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    claim(Path(html).parent, "reports folder")
    return write_text_atomic(html, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook")
    ap.add_argument("--params", required=True, help="the run's resolved parameter file (python -m lib.params ... "
                    "--out-dir: all.yaml); the notebook gets the keys it declares and records them all")
    ap.add_argument("--executed", required=True, help="where the executed notebook goes")
    ap.add_argument("--html", required=True, help="where the HTML report goes")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args(argv)
    from papermill.exceptions import PapermillExecutionError

    from lib.io import OwnershipError

    try:  # refuse a reports folder the project did not create before any work is done
        claim(Path(args.html).parent, "reports folder")
        claim(Path(args.executed).parent, "executed notebooks")
    except OwnershipError as e:
        print(f"error: {e} (REPORTS=...)", file=sys.stderr)
        return 2
    params = yaml.safe_load(Path(args.params).read_text())
    try:
        execute(args.notebook, args.executed, params, timeout=args.timeout, resolved_file=args.params)
    except PapermillExecutionError as e:
        print(f"error: {args.notebook} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
              f"(executed notebook kept at {Path(args.executed).with_suffix('.failed.ipynb')})", file=sys.stderr)
        return 1
    render_html(args.executed, args.html)
    return 0


if __name__ == "__main__":
    sys.exit(main())
