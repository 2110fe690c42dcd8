"""Regenerate every figure in figures/: run each figures/make_*.py, then execute each chapter.

Run from anywhere:  python figures/make_figures.py [NAME ...]

1. Each script figures/make_<something>.py (except this one) runs in its own Python process,
   from the repository root.
2. Each notebook chapters/*.ipynb is executed top to bottom in default mode (not
   TINYDIFF_FAST), with chapters/ as its working directory, and saved back with its outputs,
   so the committed notebook shows the same numbers and plots as the figures it wrote. Chapters
   save their figures to os.environ.get("TINYDIFF_FIGURES_DIR", "../figures").

NAME arguments keep only the scripts and notebooks whose file name contains one of them, e.g.
``python figures/make_figures.py 01_`` re-runs Chapter 1 only. One failure does not stop the
rest; the exit status is 1 if anything failed. At the end it prints every figure written.

``execute_notebook`` is also what tests/test_chapters.py uses to run the chapters in fast mode.
Executing notebooks needs nbclient, nbformat and ipykernel (the "notebooks" or "dev" extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
CHAPTERS = ROOT / "chapters"
CELL_TIMEOUT_S = 600  # per cell; the chapters' default mode takes a few minutes in all
REGENERATE_CELL_TIMEOUT_S = 3600  # per cell when regenerating: the full default mode on a machine that may be busy


def kernel_env(**overrides: str) -> dict[str, str]:
    """The environment for a notebook kernel: this one, plus ``overrides``, able to import tinydiff.

    If ``import tinydiff`` fails from chapters/ (a checkout that is not pip-installed), the
    repository root is put on PYTHONPATH. MPLBACKEND is dropped so the kernel uses its inline
    backend and the notebook keeps its plots, even when the caller runs headless with Agg.
    """
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(overrides)
    probe = subprocess.run([sys.executable, "-c", "import tinydiff"], cwd=CHAPTERS, env=env, capture_output=True)
    if probe.returncode != 0:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _kernel_manager_class():
    """An AsyncKernelManager whose "python3" kernel is run by this very interpreter (sys.executable).

    The installed "python3" kernelspec may be missing, or may point at another Python without
    tinydiff's dependencies; starting ipykernel from sys.executable avoids both.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (ipykernel)",
                language="python",
            )

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return ThisPythonKernelSpecs()

    return ThisPythonKernelManager


def execute_notebook(path: Path, env: dict[str, str], *, timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` in a fresh kernel, cwd = its folder; returns the notebook.

    Raises nbclient's CellExecutionError, naming the cell and the traceback, if any cell fails.
    The kernel is shut down and its connection file deleted before this returns or raises:
    NotebookClient creates the kernel manager itself (``kernel_manager_class``), and a client
    that owns its kernel cleans it up when ``execute`` ends. (Handed a ``km=``, it would leave
    the kernel running until this process exits.)
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_manager_class=_kernel_manager_class(),
        kernel_name="python3",
        timeout=timeout,
        record_timing=False,  # no timestamps in the saved notebook: re-running changes only outputs
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=env)
    return nb


def _figure_times() -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in FIGURES.rglob("*") if p.is_file() and p.suffix != ".py"}


def main(argv: list[str]) -> int:
    names = argv[1:]

    def selected(path: Path) -> bool:
        return not names or any(n in path.name for n in names)

    scripts = [p for p in sorted(FIGURES.glob("make_*.py")) if p.name != Path(__file__).name and selected(p)]
    notebooks = [p for p in sorted(CHAPTERS.glob("*.ipynb")) if selected(p)]
    before = _figure_times()
    failed = []

    for script in scripts:
        print(f"running {script.relative_to(ROOT)} ...", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=kernel_env())
        print(f"  {'ok' if result.returncode == 0 else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
        if result.returncode != 0:
            failed.append(script)

    env = kernel_env()
    env.pop("TINYDIFF_FAST", None)  # figures come from the full default mode
    env.pop("TINYDIFF_FIGURES_DIR", None)  # ... and go to figures/
    for notebook in notebooks:
        print(f"executing {notebook.relative_to(ROOT)} ...", flush=True)
        start = time.perf_counter()
        try:
            executed = execute_notebook(notebook, env, timeout=REGENERATE_CELL_TIMEOUT_S)
        except Exception as error:  # report and go on with the other notebooks
            print(f"  FAILED: {error}", flush=True)
            failed.append(notebook)
            continue
        import nbformat

        nbformat.write(executed, notebook)
        print(f"  ok in {time.perf_counter() - start:.0f} s; saved with outputs", flush=True)

    after = _figure_times()
    written = sorted(p for p, t in after.items() if before.get(p) != t)
    print(f"\n{len(written)} figure file(s) written:")
    for path in written:
        print(f"  {path.relative_to(ROOT)}")
    if failed:
        print(f"\nFAILED: {', '.join(str(p.relative_to(ROOT)) for p in failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
