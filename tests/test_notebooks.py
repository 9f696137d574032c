"""The lesson notebooks (lesson/*.py, jupytext percent scripts) run top to bottom at quick settings, and the
committed .ipynb files hold the same cells as their sources."""

import os
import pathlib
import sys

import jupytext
import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LESSON = ROOT / "lesson"
SOURCES = sorted(LESSON.glob("*.py"))


def test_every_section_has_a_notebook():
    assert [path.stem for path in SOURCES] == [
        "1_1_mlp",
        "2_1_cnn",
        "2_2_rnn",
        "3_1_augmentation",
        "3_2_distributed",
        "3_large_datasets",
    ]


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_committed_notebook_matches_its_source(source):
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    expected = jupytext.read(source)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells]
    assert all(c.get("outputs") for c in committed.cells if c.cell_type == "code" and "print(" in c.source)


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_notebook_runs(source, monkeypatch, tmp_path):
    # The kernel inherits this environment: quick settings, this checkout's flaxlesson, and no device flags of the
    # test suite's (a notebook that wants 8 virtual devices sets them itself, as a learner's would).
    monkeypatch.setenv("FLAXLESSON_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = jupytext.read(source)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    printed = [o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert any("largest" in text and "difference" in text for text in printed)
    assert printed[-1].strip() == sys.executable  # kernel python3 is this environment's Python
