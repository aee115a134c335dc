"""``compare``: two runs side by side, cell by cell, as ``gputech-bench compare`` shows them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..errors import ConfigError
from ._display import text_html
from ._output import Output, output_or_default
from ._run import Run, load_folder

if TYPE_CHECKING:
    import pandas as pd

    from ..report.compare import Comparison
    from ._run import Run


class RunComparison:
    """Two runs cell by cell: what ``compare()`` returns.

    ``frame`` has a row per cell both runs hold: each figure from A and from B (memory, time,
    and the task's accuracy metrics: a causal LM's next-token accuracy and perplexity), B/A (points
    for accuracy), and whether the change is beyond noise (``lower``, ``higher``, ``within
    noise``, or ``single run`` when a side was not repeated and noise is unknown).
    ``warnings`` say where the runs differ in preset, config, objective or device: read them
    first, they are usually the reason for a change, or why a comparison is unfair.

    Example::

        >>> from gputech_bench import compare
        >>> diff = compare("results/a30-run", "results/h100-run")
        >>> diff.warnings
        >>> diff.frame[["cell", "epoch_seconds_ratio", "epoch_seconds_verdict"]]
    """

    def __init__(self, comparison: "Comparison") -> None:
        self.comparison = comparison

    @property
    def warnings(self) -> list[str]:
        return list(self.comparison.warnings)

    @property
    def only_a(self) -> list[str]:
        """Cells only run A holds."""
        return list(self.comparison.only_a)

    @property
    def only_b(self) -> list[str]:
        return list(self.comparison.only_b)

    @property
    def frame(self) -> "pd.DataFrame":
        """One row per cell in both runs; a fresh DataFrame each time."""
        import pandas as pd

        rows = []
        for cell in self.comparison.cells:
            row: dict[str, object] = {"cell": cell.cell, "status_a": cell.status_a, "status_b": cell.status_b}
            for change in cell.changes:
                prefix = change.compared.prefix
                row[f"{prefix}_a"], row[f"{prefix}_b"] = change.a, change.b
                if change.compared.in_points:
                    delta = None if change.a is None or change.b is None else 100 * (change.b - change.a)
                    row[f"{prefix}_delta_points"] = delta
                else:
                    row[f"{prefix}_ratio"] = change.ratio
                row[f"{prefix}_verdict"] = change.verdict
            row["beyond_noise"] = ", ".join(cell.beyond_noise)
            rows.append(row)
        return pd.DataFrame(rows)

    def footer(self) -> list[str]:
        """The lines under the table: what the memory columns hold, and the cells in one run only."""
        from ..report.compare import footer

        return [line.removeprefix("- ") for line in footer(self.comparison)]

    def markdown(self) -> str:
        """As ``compare --format md`` writes it: warnings, the table, the footer."""
        from ..report.compare import comparison_markdown

        return comparison_markdown(self.comparison)

    def to_dict(self) -> dict:
        """As ``compare --format json`` writes it."""
        return self.comparison.to_dict()

    def _repr_html_(self) -> str:
        return text_html(str(self))

    def __str__(self) -> str:
        # The markdown (the terminal's rich table is the command line's: cli/tables.py).
        return self.markdown()

    def __repr__(self) -> str:
        c = self.comparison
        return f"<RunComparison A={c.name_a} B={c.name_b}: {len(c.cells)} cell(s) in common, {len(c.warnings)} warning(s)>"


def compare(run_a: "Union[str, Path, Run]", run_b: "Union[str, Path, Run]", *, output: Output | None = None) -> RunComparison:
    """Two runs side by side, cell by cell, as ``gputech-bench compare RUN_A RUN_B`` shows them.

    ``run_a`` and ``run_b`` are run folders or :class:`Run` objects; ratios are B/A. Returns a
    :class:`RunComparison` whose ``frame`` is the comparison as a DataFrame and whose
    ``warnings`` say where the runs differ (preset, config, objective, devices). Two runs with
    no cell in common raise :class:`UserError`.

    Example::

        >>> from gputech_bench import compare
        >>> diff = compare("results/before", "results/after")
        >>> diff                # in a notebook: the warnings and the table the command prints
        >>> diff.frame          # a pandas DataFrame, one row per cell
    """
    from ..report.compare import compare_runs

    output = output_or_default(output)
    loaded = [run._loaded if isinstance(run, Run) else load_folder(run, output) for run in (run_a, run_b)]
    comparison = compare_runs(*loaded)
    if not comparison.cells:
        raise ConfigError(f"{loaded[0].root} and {loaded[1].root} have no cell in common: compare runs of the same strategies")
    return RunComparison(comparison)


__all__ = ["RunComparison", "compare"]
