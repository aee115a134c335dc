"""examples/quickstart.ipynb, executed headless as a user runs it: a real kernel, real workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_the_notebook_is_saved_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in code_cells(notebook):
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])
    source = "\n".join("".join(cell["source"]) for cell in code_cells(notebook))
    # What the issue asks of it: the cpu preset, two strategies, a short run, the table, a plot, an estimate.
    assert 'preset = "cpu"' in source and '"train.max_steps": 4' in source
    assert 'strategies=["checkpointing", "accumulation"]' in source
    assert "run.plot(" in source and "estimate(" in source


def venv_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec for this very interpreter, found first: a user's own 'python3' kernel (another
    Python, without gputech-bench) can never be picked up, on a fresh clone or a developer's machine."""
    name = "gputech-bench-test"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gputech-bench test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files
    return name


def outputs_of(cell: dict, kind: str) -> str:
    """Every output of ``kind`` (a MIME type, or 'stream') in the cell, joined."""
    texts = []
    for output in cell["outputs"]:
        if kind == "stream" and output["output_type"] == "stream":
            texts.append(output["text"])
        elif kind in output.get("data", {}):
            data = output["data"][kind]
            texts.append("".join(data) if isinstance(data, list) else data)
    return "\n".join(texts)


@pytest.mark.slow
def test_the_quickstart_notebook_runs_headless(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Papermill's way: the cell tagged 'parameters' stays as written, and a cell after it makes the
    # run tiny (a 2-layer, 32-wide BERT on 96 sentences) so that the suite stays fast.
    [index] = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    tiny = dict(item.split("=", 1) for item in TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=3"])
    tiny_model = {key: value for key, value in tiny.items() if key.startswith("model.")}
    injected = nbformat.v4.new_code_cell(
        f"overrides = {tiny!r}\nestimate_preset = 'cpu'\nestimate_overrides = {tiny_model!r}",
        metadata={"tags": ["injected-parameters"]},
    )
    notebook.cells.insert(index + 1, injected)
    client = NotebookClient(notebook, kernel_name=venv_kernel(tmp_path, monkeypatch), timeout=900,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    cells = {"".join(cell.source).splitlines()[0]: cell for cell in notebook.cells if cell.cell_type == "code"}
    run_cell = cells["run = run_matrix("]
    table = outputs_of(run_cell, "text/html")
    # The run shows as the report's table, one row per cell: the baseline and the two strategies.
    assert 'class="gputech-bench-report"' in table and "<td>baseline</td>" in table
    assert table.count('<tr class=""><td>') + table.count('<tr class="pareto"><td>') == 3, table
    assert "tensor peak (CPU)" in table
    # Progress: drawn in the notebook and left at its end state; no complaint about ipywidgets.
    assert "cells" in table and "3/3" in table
    assert "ipywidgets" not in outputs_of(run_cell, "stream")
    assert "Traceback" not in outputs_of(run_cell, "stream")
    assert len(list((tmp_path / "results").glob("cpu-*/report.csv"))) == 1

    frame = outputs_of(cells['run.frame[["cell", "strategies", "memory_mib", "memory_x_baseline", "epoch_seconds", '
                             '"epoch_x_baseline", "status"]]'], "text/html")
    assert frame.count(">ok</td>") == 3
    assert outputs_of(cells['run.plot("memory_vs_time")'], "image/png"), "the plot did not show inline"
    predicted = outputs_of(cells["predicted = estimate("], "text/html")
    assert "tensor peak" in predicted and "fits 24.0 GiB" in predicted
