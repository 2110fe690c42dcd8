"""Every chapter notebook runs top to bottom without an error, in fast mode.

Notebooks are found by globbing chapters/*.ipynb, so a new chapter is tested as soon as it
exists. Each runs in a fresh "python3" kernel started from this interpreter, with chapters/ as
its working directory and

    TINYDIFF_FAST=1                  smaller Monte-Carlo sizes and training runs
    TINYDIFF_FIGURES_DIR=<tmp dir>   figures go there, so the test never rewrites figures/

Most chapters assert their own claims (a Monte-Carlo estimate against its closed form, a trained
model against a yardstick), so a chapter whose prose no longer matches the library fails here;
no assert may be skipped in fast mode. The kernel is started and the notebook executed by
figures/make_figures.py's ``execute_notebook``, the same code that regenerates the committed
outputs; the kernel is shut down after each notebook.
"""

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
REFERENCES = ROOT / "chapters" / "references.md"

def test_reference_list_names_tests_that_exist():
    """chapters/references.md names the test that pins each trap; a renamed test must be renamed there."""
    named = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", REFERENCES.read_text(encoding="utf-8"))
    assert len(named) >= 10
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not (ROOT / path).is_file()
        or not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert not missing, f"chapters/references.md names tests that do not exist: {missing}"


def test_citations_of_the_reference_list_name_its_sections():
    """A comment citing (chapters/references.md, "Section") names a heading that exists."""
    headings = set(re.findall(r"^#+ (.+?)\s*$", REFERENCES.read_text(encoding="utf-8"), re.MULTILINE))
    cited = [
        (path.relative_to(ROOT), section)
        for path in sorted((ROOT / "tinydiff").rglob("*.py"))
        for section in re.findall(r'chapters/references\.md, "([^"]+)"', path.read_text(encoding="utf-8"))
    ]
    assert cited, "the library cites chapters/references.md by section"
    assert all(section in headings for _, section in cited), [c for c in cited if c[1] not in headings]


pytest.importorskip("nbclient", reason="executing the chapters needs nbclient (pip install -e '.[dev]')")
pytest.importorskip("nbformat", reason="executing the chapters needs nbformat (pip install -e '.[dev]')")
pytest.importorskip("ipykernel", reason="executing the chapters needs ipykernel (pip install -e '.[dev]')")


def _load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "figures" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_figures = _load_make_figures()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill(pid, 0) would terminate the process on Windows")
@pytest.mark.parametrize("fails", [False, True], ids=["notebook runs", "cell raises"])
def test_execute_notebook_shuts_its_kernel_down(tmp_path, fails):
    """After execute_notebook returns (or raises), its kernel process is gone and so is its
    connection file: nine chapters must not leave nine kernels alive until the tests end."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    cells = [
        new_code_cell("import os; print(os.getpid())"),
        new_code_cell(
            "import sys\n"
            "connection_file = sys.argv[sys.argv.index('-f') + 1]  # the kernel's own connection file\n"
            "print(connection_file, os.path.exists(connection_file))\n"
            "open('kernel.txt', 'w').write(f'{os.getpid()} {connection_file}')"
        ),
    ]
    if fails:
        cells.append(new_code_cell("raise RuntimeError('this cell fails')"))
    path = tmp_path / "tiny.ipynb"
    nbformat.write(new_notebook(cells=cells), path)

    env = make_figures.kernel_env()
    if fails:
        with pytest.raises(Exception, match="this cell fails"):
            make_figures.execute_notebook(path, env, timeout=60)
    else:
        executed = make_figures.execute_notebook(path, env, timeout=60)
    pid_text, connection_file = (tmp_path / "kernel.txt").read_text().split()
    if not fails:
        assert executed.cells[0].outputs[0]["text"].strip() == pid_text
        assert executed.cells[1].outputs[0]["text"].split() == [connection_file, "True"], (
            "the kernel should see its connection file while it runs")
    pid = int(pid_text)
    assert pid != os.getpid()
    assert not _process_exists(pid), f"kernel process {pid} is still running after its notebook"
    assert not Path(connection_file).exists(), f"kernel connection file {connection_file} was left behind"


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found in chapters/"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_chapter_runs_in_fast_mode(notebook, tmp_path):
    env = make_figures.kernel_env(TINYDIFF_FAST="1", TINYDIFF_FIGURES_DIR=str(tmp_path))
    executed = make_figures.execute_notebook(notebook, env)  # raises CellExecutionError on a failing cell
    errors = [
        output
        for cell in executed.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, f"{notebook.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def _asserts_skipped_in_fast_mode(source: str) -> list[str]:
    """The asserts of a cell that run only when FAST is false (under ``if not FAST:`` or the
    ``else`` of ``if FAST:``), or only when it is true: fast mode would not check the same claims."""
    skipped = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.If):
            continue
        test = ast.unparse(node.test)
        if test in ("FAST", "not FAST") or test.startswith(("FAST and", "not FAST and")):
            for branch in (node.body, node.orelse):
                skipped += [ast.unparse(n) for stmt in branch for n in ast.walk(stmt) if isinstance(n, ast.Assert)]
    return skipped


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_claim_is_checked_in_fast_mode(notebook):
    """The tests run the chapters in fast mode, so an assert that fast mode skips is never checked.
    A claim that a shorter fast-mode run cannot support as stated gets a fast-mode form that still
    fails for a broken model (chapters/README.md, "For authors of new chapters")."""
    import nbformat

    cells = [c.source for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    skipped = [a for source in cells for a in _asserts_skipped_in_fast_mode(source)]
    assert not skipped, f"{notebook.name}: asserts that depend on TINYDIFF_FAST: {skipped}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_chapter_carries_its_outputs(notebook):
    """Chapters are committed executed, top to bottom, so they read well on a code host."""
    import nbformat

    cells = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{notebook.name} is not saved as one top-to-bottom run (execution counts {counts}); "
        f"regenerate it with: python figures/make_figures.py {notebook.stem}"
    )
