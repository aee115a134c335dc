"""The catalogue of metrics: one declaration per metric any result holds, one list of memory
categories, and every reader showing the task's accuracy metrics (a masked-LM's masked
accuracy; a causal LM's next-token accuracy and perplexity), on runs with repeats."""

from __future__ import annotations

import ast
import io
import json
import re
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from gputech_bench import metrics
from gputech_bench.api import compare as api_compare
from gputech_bench.api import load_run as api_load_run
from gputech_bench.cli.common import OutputConsole, print_table
from gputech_bench.cli.tables import comparison_table, results_table
from gputech_bench.estimator.render import QUANTIZED as QUANTIZED_COLUMN
from gputech_bench.estimator.render import SHOWN_CATEGORIES
from gputech_bench.metrics import (
    CATALOGUE,
    MASKED_ACCURACY,
    MEMORY_CATEGORIES,
    NEXT_TOKEN_ACCURACY,
    PERPLEXITY,
    Direction,
    RankMerge,
)
from gputech_bench.report.compare import compare_runs, comparison_markdown
from gputech_bench.report.export import render
from gputech_bench.report.frame import BREAKDOWN_COLUMNS, CATEGORIES, DERIVED_COLUMNS, METRIC_COLUMNS, build_frame
from gputech_bench.report.plots import SEGMENTS, accuracy_chart
from gputech_bench.results import MEMORY_METRICS, load_run
from gputech_bench.stats import WITHIN_NOISE

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "plots"
#: A masked-LM run and a causal LM's, both with repeats (5 and 3 per cell).
MASKED_LM_RUN, CAUSAL_LM_RUN = "repeats", "causal"

# --------------------------------------------------------------------------- the catalogue


def _recorded_by_the_worker() -> set[str]:
    """Every metric name the worker records (``result.record("name", ...)``), read from its source."""
    tree = ast.parse((ROOT / "gputech_bench" / "worker" / "cell.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "record"
                and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return names


def _in_fixture_results() -> set[str]:
    return {name for run in FIXTURES.iterdir() for result in load_run(run).results for name in result.metrics}


def test_every_metric_a_result_holds_is_declared_once():
    recorded, stored = _recorded_by_the_worker(), _in_fixture_results()
    assert len(recorded) > 15  # the parse found the worker's figures
    assert recorded | stored <= {metric.name for metric in metrics.MEASURED}
    assert [metric.name for metric in metrics.MEASURED] == list(METRIC_COLUMNS)
    assert [metric.name for metric in metrics.DERIVED_METRICS] == list(DERIVED_COLUMNS)
    every = [*metrics.MEASURED, *metrics.DERIVED_METRICS]
    assert len({metric.name for metric in every}) == len(every) == len(CATALOGUE)


def test_a_metric_declared_twice_is_refused_with_its_name():
    with pytest.raises(ValueError, match="'epoch_seconds' is declared twice"):
        metrics._by_name((metrics.EPOCH_SECONDS, metrics.EPOCH_SECONDS))


def test_the_frames_figures_are_the_catalogues_and_its_categories_the_one_list():
    """Every figure column of the frame is a declared metric, every declared metric a column; the
    rest are the breakdown by category, the out-of-memory details, the verdicts and the facts."""
    assert set(METRIC_COLUMNS) | set(DERIVED_COLUMNS) == set(CATALOGUE)
    for run in FIXTURES.iterdir():
        frame, _ = build_frame(load_run(run).results)
        figures = [column for column in frame.columns if column in CATALOGUE]
        assert figures == [*DERIVED_COLUMNS, *METRIC_COLUMNS], run.name
        assert [c for c in frame.columns if c.startswith("tracked_") and c not in CATALOGUE] == list(BREAKDOWN_COLUMNS)


def test_ranks_merge_memory_as_the_largest_and_the_rest_as_the_lowest_ranks():
    assert MEMORY_METRICS == ("peak_allocated_mib", "peak_reserved_mib", "nvml_process_peak_mib", "tracked_peak_mib",
                              "tracked_host_peak_mib", "peak_rss_mib")
    assert [m.name for m in metrics.merged_as(RankMerge.LOWEST_RANK_ALL_SAMPLES)] == ["samples_per_second"]
    assert {m.ranks for m in metrics.DERIVED_METRICS} == {RankMerge.DERIVED}
    assert RankMerge.DERIVED not in {m.ranks for m in metrics.MEASURED}


def test_each_tasks_accuracy_metrics_apply_to_it_and_are_labelled():
    from gputech_bench.modeling import CLM, MLM

    assert (metrics.MASKED_LM, metrics.CAUSAL_LM) == (MLM, CLM)
    for task, chosen in metrics.TASK_METRICS.items():
        assert chosen.task == task
        for metric in (chosen.accuracy, chosen.second, *chosen.compared):
            assert task in metric.tasks and metric.shown_as.terminal
        assert metrics.DELTA_OF[chosen.delta] is chosen.accuracy
    assert metrics.task_metrics(["clm", None]) is metrics.CAUSAL_LM_METRICS
    assert metrics.task_metrics([None, "mlm"]) is metrics.task_metrics([]) is metrics.MASKED_LM_METRICS
    assert (MASKED_ACCURACY.direction, PERPLEXITY.direction) == (Direction.HIGHER, Direction.LOWER)
    with pytest.raises(LookupError, match="'epoch_seconds' is shown by name"):
        metrics.EPOCH_SECONDS.shown_as  # noqa: B018


def test_every_reader_of_memory_categories_takes_the_one_list():
    from gputech_bench.estimator.trace import STATE_CATEGORIES, TRANSIENT_CATEGORIES
    from gputech_bench.estimator.render import WHEN_PRESENT
    from gputech_bench.measure.tracker import CATEGORY_NAMES, FSDP_CATEGORY_NAMES, QUANTIZED

    names = [category.name for category in MEMORY_CATEGORIES]
    assert list(CATEGORIES) == names
    assert len(set(names)) == len(names)  # each declared once
    # MemTracker's own types; FSDPMemTracker's (gathered apart); the two the estimate adds itself.
    assert set(CATEGORY_NAMES.values()) | {QUANTIZED, "gradient_buckets", "gathered"} == set(names)
    assert set(FSDP_CATEGORY_NAMES.values()) == set(names) - {QUANTIZED, "gradient_buckets"}
    assert [FSDP_CATEGORY_NAMES[kind] for kind in ("Sharded Param", "Sharded Grad", "OptState")] == [
        "parameters", "gradients", "optimizer_state"]
    assert {FSDP_CATEGORY_NAMES[kind] for kind in ("Unsharded Param", "Unsharded Grad", "All Gather",
                                                    "Reduce Scatter")} == {"gathered"}
    assert [name for name, _ in (*SHOWN_CATEGORIES, QUANTIZED_COLUMN)] == [
        "parameters", "gradients", "optimizer_state", "activations", "temporaries", "quantized_weights"]
    assert [name for name, _ in WHEN_PRESENT] == ["quantized_weights", "gathered", "gradient_buckets"]
    assert [key for key, _, _ in SEGMENTS][:7] == [
        "parameters", "quantized_weights", "gradients", "optimizer_state", "activations", "temporaries", "other"]
    assert (STATE_CATEGORIES, TRANSIENT_CATEGORIES) == (
        ("parameters", "gradients", "optimizer_state"), ("activations", "temporaries", "other", "gathered"))


# --------------------------------------------------------------------------- every reader, each task, repeated

#: What a reader shows for each task: the labels it must hold, and those it must not.
SHOWN = {
    MASKED_LM_RUN: (MASKED_ACCURACY,),
    CAUSAL_LM_RUN: (NEXT_TOKEN_ACCURACY, PERPLEXITY),
}
NOT_SHOWN = {
    MASKED_LM_RUN: (NEXT_TOKEN_ACCURACY, PERPLEXITY),
    CAUSAL_LM_RUN: (MASKED_ACCURACY,),
}
BOTH = pytest.mark.parametrize("run_name", [MASKED_LM_RUN, CAUSAL_LM_RUN])


def _run(run_name: str):
    run = load_run(FIXTURES / run_name)
    assert all((result.repeats or {}).get("ok", 0) >= 3 for result in run.results)  # every cell repeated
    return run


def _assert_columns(frame: pd.DataFrame, run_name: str) -> None:
    """The task's accuracy metrics hold a value in every row and are judged against the
    baseline from the repeats; the other task's hold none and have no verdict."""
    for metric in SHOWN[run_name]:
        assert frame[metric.name].notna().all(), metric.name
        verdicts = frame.set_index("cell")[metric.versus_baseline]
        assert verdicts.drop("baseline").notna().all() and pd.isna(verdicts["baseline"])
    for metric in NOT_SHOWN[run_name]:
        assert frame[metric.name].isna().all(), metric.name
        assert metric.versus_baseline not in frame.columns


def _assert_labels(text: str, run_name: str, kind: str) -> None:
    """``text`` names the task's accuracy metrics as ``kind`` labels them, and never the other task's."""
    for metric in SHOWN[run_name]:
        assert getattr(metric.shown_as, kind) in text, (metric.name, kind)
    _assert_not_labelled(text, run_name)


def _assert_not_labelled(text: str, run_name: str) -> None:
    for metric in NOT_SHOWN[run_name]:
        labels = metric.shown_as
        assert labels.terminal not in text and labels.markdown not in text and labels.long not in text, metric.name
    if run_name == CAUSAL_LM_RUN:
        assert "masked" not in text.lower()
    else:
        assert "next-token" not in text and "next token" not in text and "perplexity" not in text


@BOTH
def test_the_terminal_table_shows_the_tasks_accuracy(run_name: str):
    frame, measure = build_frame(_run(run_name).results)
    buffer = StringIO()
    print_table(results_table(frame, measure, title=run_name), out=OutputConsole(file=buffer, color_system=None, width=250))
    _assert_labels(buffer.getvalue(), run_name, "terminal")
    assert "medians of" in buffer.getvalue()


@BOTH
def test_the_markdown_shows_the_tasks_accuracy(run_name: str):
    text = render(_run(run_name), "md")
    header = text.splitlines()[0]
    _assert_labels(header, run_name, "markdown")
    _assert_not_labelled(text.split("- **device:**")[0], run_name)  # nor do the notes above the provenance


@BOTH
def test_the_csv_holds_the_tasks_accuracy(run_name: str):
    _assert_columns(pd.read_csv(io.StringIO(render(_run(run_name), "csv"))), run_name)


@BOTH
def test_the_json_holds_the_tasks_accuracy(run_name: str):
    payload = json.loads(render(_run(run_name), "json"))
    _assert_columns(pd.DataFrame(payload["rows"]), run_name)
    for metric in (*SHOWN[run_name], *NOT_SHOWN[run_name]):  # directions are the catalogue's, whatever the task
        listed = "higher_is_better" if metric.direction is Direction.HIGHER else "lower_is_better"
        assert metric.name in payload[listed]


@BOTH
def test_the_html_shows_the_tasks_accuracy(run_name: str):
    text = render(_run(run_name), "html")
    headers = " | ".join(re.findall(r"<th>([^<]*)</th>", text))
    _assert_labels(headers, run_name, "long")
    assert text.count("data:image/png;base64,") == 3  # the accuracy plot too: the cells were repeated


@BOTH
def test_the_api_frame_holds_the_tasks_accuracy(run_name: str):
    run = api_load_run(FIXTURES / run_name)
    _assert_columns(run.frame, run_name)


@BOTH
def test_compare_shows_the_tasks_accuracy(run_name: str):
    run = _run(run_name)
    comparison = compare_runs(run, run)
    assert [change.figure for change in comparison.cells[0].changes] == [
        "memory", "time / epoch", *(metric.shown_as.long for metric in SHOWN[run_name])]
    verdicts = {change.verdict for cell in comparison.cells for change in cell.changes[2:]}
    assert verdicts == {WITHIN_NOISE}  # the accuracy metrics judged from both sides' repeats
    markdown = comparison_markdown(comparison)
    _assert_labels(markdown.splitlines()[3], run_name, "abbreviation")
    as_json = json.dumps(comparison.to_dict())
    _assert_labels(as_json, run_name, "long")
    buffer = StringIO()
    print_table(comparison_table(comparison), out=OutputConsole(file=buffer, color_system=None, width=250))
    _assert_labels(buffer.getvalue(), run_name, "abbreviation")
    frame = api_compare(FIXTURES / run_name, FIXTURES / run_name).frame
    for metric in SHOWN[run_name]:
        assert frame[f"{metric.stem}_a"].notna().all() and f"{metric.stem}_verdict" in frame
        assert (f"{metric.stem}_delta_points" if metric.is_fraction else f"{metric.stem}_ratio") in frame
    for metric in NOT_SHOWN[run_name]:
        assert not any(column.startswith(metric.stem) for column in frame.columns)


@BOTH
def test_the_accuracy_plot_shows_the_tasks_accuracy(run_name: str):
    run = _run(run_name)
    frame, _ = build_frame(run.results)
    chart = accuracy_chart(run, frame)
    assert chart is not None
    assert [ax.get_ylabel() for ax in chart.axes] == [metric.shown_as.axis for metric in SHOWN[run_name]]
    title = chart.axes[0].get_title()
    assert ("Next-token accuracy and perplexity" in title) == (run_name == CAUSAL_LM_RUN)
    assert ("Masked-token accuracy" in title) == (run_name == MASKED_LM_RUN)
