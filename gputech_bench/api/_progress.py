"""Progress while cells run or traces are made: a live display in a terminal or a notebook,
clean lines anywhere else.

In a terminal, rich's Progress redraws in place and leaves when done (only the one line per
finished cell stays). In a notebook, rich's own live display needs ipywidgets, which this
project does not depend on; :class:`NotebookProgress` draws the same bars into one IPython
display that is updated in place, and leaves the final state behind (how long it took).
Into a pipe, a file or a log, nothing redraws: there are only the lines per cell.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from ..results import CellResult
from ._display import rich_html


class _DisplayHandle:
    """One IPython output, shown at the first update and replaced by each later one."""

    def __init__(self) -> None:
        self._handle: Any = None

    def __call__(self, html: str) -> None:
        from IPython.display import HTML, display

        if self._handle is None:
            self._handle = display(HTML(html), display_id=True)
        else:
            self._handle.update(HTML(html))


class NotebookProgress(Progress):
    """rich's Progress drawn into a notebook through one display that is updated in place.

    The bars are rich's own renderables exported as HTML, so they read as in a terminal.
    Updates are drawn at most every ``MIN_INTERVAL`` seconds (a tiny cell sends a step event
    every few milliseconds); a finished task and the end are always drawn. Events arrive on
    the runner's relay threads as well as the main one, hence the lock."""

    MIN_INTERVAL = 0.5

    def __init__(self, *columns: Any, console: Console, show: Callable[[str], None] | None = None, **kwargs: Any):
        kwargs.pop("transient", None)  # the final state stays: it says how long the run took
        # disable: no rich Live, no refresh thread; this class draws instead.
        super().__init__(*columns, console=console, disable=True, **kwargs)
        self._show = show or _DisplayHandle()
        self._drawn_at = float("-inf")
        self._draw_lock = threading.Lock()

    def _draw(self, force: bool = False) -> None:
        with self._draw_lock:
            now = time.monotonic()
            if not force and now - self._drawn_at < self.MIN_INTERVAL:
                return
            self._drawn_at = now
            self._show(rich_html(self.get_renderable(), width=self.console.width))

    def start(self) -> None:
        self._draw(force=True)

    def stop(self) -> None:
        self._draw(force=True)

    def refresh(self) -> None:
        self._draw()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._draw()

    def advance(self, *args: Any, **kwargs: Any) -> None:
        super().advance(*args, **kwargs)
        self._draw(force=True)

    def remove_task(self, *args: Any, **kwargs: Any) -> None:
        super().remove_task(*args, **kwargs)
        self._draw(force=True)


def live_progress(console: Console, *columns: Any, transient: bool = True) -> Progress:
    """A rich Progress on ``console``: drawn in a notebook by :class:`NotebookProgress`,
    by rich itself in a terminal, and not at all into a pipe."""
    if console.is_jupyter:
        return NotebookProgress(*columns, console=console)
    # Into a pipe rich draws nothing, but its stop() still prints an empty line: not even that.
    return Progress(*columns, console=console, transient=transient, disable=not console.is_terminal)


def trace_progress(console: Console) -> Progress:
    """The bar while the estimate traces setups on fake tensors."""
    return live_progress(console, TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn())


class MatrixProgress:
    """Runs done out of N, and a step bar for each running cell (several with --gpus), and a
    line per finished cell with its status (``run_matrix(progress=False)`` makes none of this)."""

    def __init__(self, total: int, console: Console) -> None:
        self.console = console
        # Only the bar shrinks in a narrow terminal: a cell's name and the counts stay whole.
        whole: dict[str, Any] = dict(table_column=Column(no_wrap=True))
        self.progress = live_progress(
            console, TextColumn("[bold]{task.description}", **whole), BarColumn(), MofNCompleteColumn(**whole),
            TimeElapsedColumn(**whole), TimeRemainingColumn(**whole),
        )
        self.overall = self.progress.add_task("cells", total=total)
        self.bars: dict[str, tuple[Any, str]] = {}  # label -> (its step bar, its title)
        self.labels: dict[int, str] = {}  # job index -> label

    def __enter__(self) -> "MatrixProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def cell_started(self, index: int, label: str, slot: Any = None) -> None:
        self.labels[index] = label
        title = f"  {label}" + (f" on GPU {','.join(slot)}" if slot else "")
        self.bars[label] = (self.progress.add_task(f"{title}: starting", total=None), title)

    def cell_finished(self, index: int, result: CellResult) -> None:
        self.progress.advance(self.overall)
        label = self.labels.pop(index, result.cell)
        bar = self.bars.pop(label, None)
        if bar is not None:
            self.progress.remove_task(bar[0])
        status = result.status
        mark = "[green]ok[/]" if status == "ok" else f"[bold red]{status}[/]: {escape(result.reason or '')}"
        self.console.print(f"  {escape(label)}: {mark}", highlight=False)

    def event(self, label: str, event: dict[str, Any]) -> None:
        if label not in self.bars:
            return
        task, title = self.bars[label]
        if event["event"] == "phase":
            self.progress.update(task, description=f"{title}: {event['phase']}")
        elif event["event"] == "step":
            self.progress.update(task, description=f"{title}: train", completed=event["step"], total=event["total"])
