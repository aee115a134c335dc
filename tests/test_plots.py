"""The run's PNG plots, from trimmed result files: a CPU run, a CUDA-like run with an oom cell and
a cell only the estimate knows, and a run with repeats."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection
from matplotlib.image import imread
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from gputech_bench.report.frame import build_frame
from gputech_bench.report.plots import (
    ACCURACY_PNG,
    BREAKDOWN_PNG,
    DPI,
    ESTIMATED,
    FIGSIZE,
    MEASURED,
    MEMORY_TIME_PNG,
    accuracy_chart,
    breakdown_stacks,
    memory_breakdown_chart,
    memory_time_chart,
    png_bytes,
    write_plots,
)
from gputech_bench.results import load_run
from gputech_bench.units import MIB

FIXTURES = Path(__file__).parent / "fixtures" / "plots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: imread's (rows, columns, RGBA) for a chart of FIGSIZE inches at DPI.
PNG_SHAPE = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI), 4)


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert imread(io.BytesIO(data)).shape == PNG_SHAPE


@pytest.fixture(scope="module")
def cpu():
    return load_run(FIXTURES / "cpu")


@pytest.fixture(scope="module")
def cuda():
    return load_run(FIXTURES / "cuda")


def test_a_cpu_run_gets_the_two_memory_plots_of_a_fixed_size_and_no_accuracy_plot(cpu, tmp_path):
    out = tmp_path / "plots" / "cpu"  # created on demand
    written = write_plots(cpu, out)
    assert [path.name for path in written] == [MEMORY_TIME_PNG, BREAKDOWN_PNG]
    for path in written:
        assert_png(path.read_bytes())
    assert not (out / ACCURACY_PNG).exists()
    assert accuracy_chart(cpu, build_frame(cpu.results)[0]) is None


def test_a_repeated_run_adds_the_accuracy_plot(tmp_path):
    run = load_run(FIXTURES / "repeats")
    written = write_plots(run, tmp_path)
    assert [path.name for path in written] == [MEMORY_TIME_PNG, BREAKDOWN_PNG, ACCURACY_PNG]
    assert_png((tmp_path / ACCURACY_PNG).read_bytes())
    # one median with its min-max bar per repeated cell, and every repeat as a dot (or a cross, if an outlier)
    ax = accuracy_chart(run, build_frame(run.results)[0]).axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["baseline\n(n=5)", "4\n(n=5)", "sparse-head\n(n=5)"]
    dots = sorted(y for collection in ax.collections if isinstance(collection, PathCollection) for _, y in collection.get_offsets())
    values = [value for result in run.results for value in result.repeats["statistics"]["eval_masked_accuracy"]["values"]]
    assert dots == pytest.approx(sorted(100 * value for value in values))


def test_a_failed_cell_is_a_labelled_cross_at_the_edge_and_the_plot_still_draws(cuda):
    frame, measure = build_frame(cuda.results)
    assert frame.set_index("cell").loc["2", "status"] == "oom"
    chart = memory_time_chart(frame, measure, run_name="cuda")
    assert_png(png_bytes(chart))
    ax = chart.axes[0]
    labels = {text.get_text() for text in ax.texts if isinstance(text, Annotation)}
    assert labels == {"baseline", "1", "4", "1+2+3", "2: oom"}
    assert ax.get_ylabel() == "GPU memory (NVML) (GiB)"


def test_cell_labels_do_not_overlap(cpu):
    frame, measure = build_frame(cpu.results)
    chart = memory_time_chart(frame, measure)
    renderer = chart.canvas.get_renderer()
    boxes = [Text.get_window_extent(text, renderer) for text in chart.axes[0].texts if isinstance(text, Annotation)]
    assert len(boxes) == len(cpu.results)
    assert all(Bbox.intersection(a, b) is None for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_breakdown_uses_the_estimate_for_a_cell_without_tracked_figures(cuda):
    frame, measure = build_frame(cuda.results)
    stacks, skipped = breakdown_stacks(cuda, frame)
    by_cell = {stack.cell: stack for stack in stacks}
    assert skipped == ["2 (oom)"]  # neither tracked nor estimated

    estimated = by_cell["1+2+3"]
    assert estimated.source == ESTIMATED
    # the run trained at micro-batch 8 (config.json); the estimate also traced micro-batch 4
    predictions = json.loads((FIXTURES / "cuda" / "estimate.json").read_text())["predictions"]
    traced = next(p for p in predictions if p["micro_batch_size"] == 8)["device"]["by_category"]
    assert estimated.device["activations"] == pytest.approx(traced["activations"] / MIB)
    assert estimated.device["other"] == pytest.approx(traced["buffers"] / MIB)  # buffers fold into other
    # CUDA's overheads come from the cell's own measured figures: NVML - reserved, reserved - allocated
    assert estimated.device["cuda_context"] == pytest.approx(4250.0 - 3700.0)
    assert estimated.device["allocator_reserve"] == pytest.approx(3700.0 - 3300.0)

    measured = by_cell["baseline"]
    assert measured.source == MEASURED and measured.device["activations"] == 9200.0 and not measured.host
    # strategy 4 keeps its fp32 master, gradients and optimizer state on the host
    assert by_cell["4"].host == {"parameters": 418.0, "gradients": 418.0, "optimizer_state": 836.0}
    assert_png(png_bytes(memory_breakdown_chart(cuda, frame, measure)))


def test_without_an_estimate_a_cell_with_no_tracked_figures_is_skipped(tmp_path):
    run_dir = tmp_path / "cuda"
    shutil.copytree(FIXTURES / "cuda", run_dir, ignore=shutil.ignore_patterns("estimate.json"))
    run = load_run(run_dir)
    frame, _ = build_frame(run.results)
    stacks, skipped = breakdown_stacks(run, frame)
    assert skipped == ["2 (oom)", "1+2+3"]
    assert {stack.source for stack in stacks} == {MEASURED}


def test_a_cpu_breakdown_has_tensor_categories_only(cpu):
    frame, _ = build_frame(cpu.results)
    stacks, skipped = breakdown_stacks(cpu, frame)
    assert not skipped and len(stacks) == len(cpu.results)
    baseline = next(stack for stack in stacks if stack.cell == "baseline")
    assert set(baseline.device) == {"parameters", "optimizer_state", "activations", "temporaries", "other"}  # no zeros
    assert sum(baseline.device.values()) == pytest.approx(baseline.measure_mib, abs=0.01)
