"""What every command shares: the consoles, one-line failures, exit codes and the
resolved config. Kept apart from cli/__init__.py so that command modules registered on the app
(estimate, fit) can import it without a cycle."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table
from rich.text import Text

from ..api import Output
from ..files import atomic_write_bytes

EXIT_FAILED_CELL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class OutputConsole(Console):
    """The commands' console. Into a pipe, a file, a CI or slurm log (not a terminal) a
    printed line is never wrapped: it stays whole for grep and for whoever reads the log.
    In a terminal, prose wraps at word boundaries as usual, except that a figure and its
    unit ('80.8 MiB', '689 s') stay on one line. Tables go through :func:`print_table`."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if kwargs.get("soft_wrap") is None:
            if not self.is_terminal:
                kwargs["soft_wrap"] = True
            elif objects and all(isinstance(o, (str, Text)) for o in objects) and set(kwargs) <= _PROSE_OPTIONS:
                text = Text(" ").join(
                    self.render_str(o, markup=kwargs.get("markup"), highlight=kwargs.get("highlight")) if isinstance(o, str) else o
                    for o in objects
                )
                lines = [line for physical in text.split("\n", allow_blank=True) for line in wrap_text(physical, self.width)]
                super().print(Text("\n").join(lines), style=kwargs.get("style"), end=kwargs.get("end", "\n"),
                              soft_wrap=True, highlight=False)
                return
        super().print(*objects, **kwargs)


#: print() options the figure-keeping wrap in a terminal understands; others go to rich as they are.
_PROSE_OPTIONS = {"markup", "highlight", "style", "end"}

console = OutputConsole()
errors = OutputConsole(stderr=True)

#: A number followed by its unit: the pair is one word when text is wrapped.
_UNIT = re.compile(r"(?:[KMGT]i?B|B|m?s|pts?|points|steps?|sentences|cells?|x|%)(?![\w])")


def _words(plain: str) -> list[list[int]]:
    """[start, end) of each word of ``plain``, a figure and its unit ('80.8 MiB') as one."""
    words: list[list[int]] = []
    for match in re.finditer(r"\S+", plain):
        previous = words[-1] if words else None
        if previous and plain[previous[1] - 1].isdigit() and plain[previous[1]:match.start()] == " " \
                and _UNIT.match(plain, match.start()):
            previous[1] = match.end()
        else:
            words.append([match.start(), match.end()])
    return words


def longest_word(text: str) -> int:
    """The narrowest width that wraps ``text`` without breaking a word or a figure."""
    return max((cell_len(text[start:end]) for start, end in _words(text)), default=0)


def wrap_text(text: Text, width: int, indent: int | None = None) -> list[Text]:
    """``text`` (one line) broken at spaces into lines of at most ``width`` cells; a
    figure and its unit never part. Continuation lines are indented by ``indent``
    (default: the line's own leading spaces plus two). A word longer than the width
    keeps a line of its own, whole: nothing is ever cut."""
    plain = text.plain
    lead = len(plain) - len(plain.lstrip(" "))
    hang = lead + 2 if indent is None else indent
    words = _words(plain)
    if not words or text.cell_len <= width:
        return [text]
    lines: list[Text] = []
    start, end = 0, words[0][1]
    for word_start, word_end in words[1:]:
        if (hang if lines else 0) + cell_len(plain[start:word_end]) > width:
            lines.append(text[start:end])
            start = word_start
        end = word_end
    lines.append(text[start:end])
    return [lines[0], *(Text(" " * hang) + line for line in lines[1:])]


def messages_to_stderr() -> Callable[[], None]:
    """While a command prints machine-readable output (``--format csv``, ``json``, ``md``)
    on stdout, everything else it says goes to stderr, so that ``> file`` or ``| jq`` get
    that output alone. Returns the function that undoes it."""
    console.stderr = True

    def undo() -> None:
        console.stderr = False

    return undo


def fail(message: str) -> None:
    """One line naming the problem and the fix, exit status 2, no traceback."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def output(stdout_is_data: bool = False) -> Output:
    """The commands' consoles, for the API calls a command makes: its messages print as the command's.

    ``stdout_is_data``: the command writes JSON or markdown to stdout, so its messages and
    progress go to stderr, and a pipe receives the data alone."""
    return Output(errors if stdout_is_data else console, errors)


def emit(text: str, output: Optional[Path]) -> None:
    """Text output (markdown, CSV, JSON, HTML) to stdout as it is, or atomically to ``output``."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        atomic_write_bytes(output, text.encode("utf-8"))
    except OSError as error:
        fail(f"cannot write '{output}' ({error.strerror or error}): pass a writable --output path")
    console.print(f"wrote {output}", highlight=False)


# The options that choose the config, declared once for run, estimate and fit.
PRESET_OPTION = typer.Option(None, help="Preset name (see `gputech-bench presets`); default: seed with CUDA, cpu without.")
SET_OPTION = typer.Option([], "--set", help="Override a setting, e.g. --set train.epochs=1 or --set data.max_length=512 (repeatable).")
MODEL_OPTION = typer.Option(None, help="Local Hugging Face folder (or hub id) of a masked-LM or causal LM; estimate and fit read only its config.json.")
TRAIN_FILE_OPTION = typer.Option(None, help="Training text, one sentence per line; the tokenizer is trained on it unless --model brings one.")

#: How to see what a narrow terminal left out, for the commands that have --format md.
MORE_HINT = "`--format md` or a wider terminal shows everything"
#: A descriptive column narrower than this is more fold than text: the table drops it instead.
FOLD_MIN = 10
#: What a narrow terminal gives up, in order, before a table is split: its outer edge, then its lines.
_LAYOUTS: tuple[dict[str, Any], ...] = (
    {},
    {"show_edge": False, "pad_edge": False},
    {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "padding": (0, 1, 0, 0)},
)
_WIDE = 1_000_000


@dataclasses.dataclass
class _Fit:
    column: Column
    natural: int  # the column's width with nothing wrapped
    need: int  # the narrowest it may be
    descriptive: bool

    @property
    def name(self) -> str:
        return " ".join(str(self.column.header).split())


def _measure(out: Console, renderable: Any) -> Measurement:
    return Measurement.get(out, out.options.update_width(_WIDE), renderable)


def _plain(out: Console, renderable: Any) -> str:
    if isinstance(renderable, Text):
        return renderable.plain
    return out.render_str(renderable).plain if isinstance(renderable, str) else ""


def _fit(out: Console, column: Column, descriptive: bool) -> _Fit:
    header = _measure(out, column.header)
    header_word = longest_word(_plain(out, column.header))
    cells = [_measure(out, cell).maximum for cell in column.cells]
    natural = max([header.maximum, *cells])
    if descriptive:
        need = min(natural, max(FOLD_MIN, header_word))
    else:
        need = max([header_word, *cells, column.min_width or 0])
    return _Fit(column, natural, need, descriptive)


def _variant(table: Table, fits: list[_Fit], widths: Sequence[int | None], layout: dict[str, Any]) -> Table:
    """The table without its title and caption, with these columns at these widths."""
    variant = copy.copy(table)
    variant.title = variant.caption = None
    for key, value in layout.items():
        setattr(variant, key, value)
    variant.columns = []
    for index, (fit, width) in enumerate(zip(fits, widths)):
        # Never an ellipsis: a width that is wrong shows as a fold, not as a figure cut short.
        changes: dict[str, Any] = {"_index": index, "overflow": "fold"}
        if width is not None:
            changes.update(width=width, min_width=None, max_width=None, no_wrap=False)
            if isinstance(fit.column.header, (str, Text)):  # wrapped here, where a figure keeps its unit
                header = fit.column.header if isinstance(fit.column.header, Text) else Text.from_markup(fit.column.header)
                changes["header"] = Text("\n").join(wrap_text(header, width, indent=0))
        variant.columns.append(dataclasses.replace(fit.column, **changes))
    return variant


def _width(out: Console, table: Table, fits: list[_Fit], widths: list[int], layout: dict[str, Any]) -> int:
    return _measure(out, _variant(table, fits, widths, layout)).maximum


def _fitted(out: Console, table: Table, fits: list[_Fit], layout: dict[str, Any]) -> tuple[Table, list[str]] | None:
    """The table at the terminal's width in this layout and the descriptive columns it
    folds, or None when it cannot fit. Each column starts at its need; the room left goes
    to the descriptive columns (so that they fold less), then to the headers that would
    otherwise wrap, the nearest to one line first."""
    widths = [fit.need for fit in fits]
    room = out.width - _width(out, table, fits, widths, layout)
    if room < 0:
        return None
    order = sorted(range(len(fits)), key=lambda i: (not fits[i].descriptive, fits[i].natural - fits[i].need))
    for index in order:
        grow = fits[index].natural - widths[index]
        if grow <= room:  # a header that still wraps gains nothing from a little more room
            widths[index] += grow
            room -= grow
        elif fits[index].descriptive:
            widths[index] += room
            room = 0
    folded = [fit.name for fit, width in zip(fits, widths) if fit.descriptive and width < fit.natural]
    return _variant(table, fits, widths, layout), folded


def _narrow(out: Console, table: Table, fits: list[_Fit]) -> tuple[list[Table], list[str]]:
    """The table(s) that fit a terminal narrower than the table, and what was given up."""
    for layout in _LAYOUTS:
        fitted = _fitted(out, table, fits, layout)
        if fitted is not None:
            return [fitted[0]], _said("folded", fitted[1])
    described = [fit for fit in fits if fit.descriptive]
    kept = [fit for fit in fits if not fit.descriptive]
    if described:
        for layout in _LAYOUTS:
            fitted = _fitted(out, table, kept, layout)
            if fitted is not None:
                return [fitted[0]], _said("left out", [fit.name for fit in described])
    # Split: the first column (the rows' names) repeated before each group of columns, in
    # the layout that needs the fewest tables.
    best: list[list[_Fit]] = []
    best_layout = _LAYOUTS[-1]
    for layout in _LAYOUTS:
        groups: list[list[_Fit]] = []
        for fit in fits[1:]:
            candidate = [fits[0], *groups[-1], fit] if groups else []
            if candidate and _width(out, table, candidate, [f.need for f in candidate], layout) <= out.width:
                groups[-1].append(fit)
            else:
                groups.append([fit])
        if not best or len(groups) < len(best):
            best, best_layout = groups, layout
    tables, folded = [], []
    for group in best:
        part = [fits[0], *group]
        # A group too wide on its own (a terminal narrower than a name and a figure) is printed
        # whole, past the edge, rather than cut.
        fitted = _fitted(out, table, part, best_layout) or (_variant(table, part, [f.need for f in part], best_layout), [])
        tables.append(fitted[0])
        folded += fitted[1]
    return tables, [f"columns split over {len(tables)} tables", *_said("folded", folded)]


def _said(what: str, names: list[str]) -> list[str]:
    return [f"{', '.join(names)} {what}"] if names else []


def print_table(table: Table, out: Optional[Console] = None, hint: str = "a wider terminal shows everything") -> None:
    """How every command prints a table; no figure and no name in it is ever cut.

    The title prints above and the caption below as lines of their own, so that a long note
    never sets the table's width. Into a pipe, a file or a log (not a terminal) the table has
    its natural width: nothing in it wraps, however wide. In a terminal narrower than that,
    the table gives up, in order: header lines (labels wrap at word boundaries), its outer
    edge, its box lines, its descriptive columns (those made with ``overflow="fold"``: they
    fold, then are left out), and last its unity: it is split into tables that each repeat
    the first column. Every other column stays as wide as its widest cell, so figures never
    wrap; one dim line says what was folded or left out, and ``hint`` how to see all of it.
    """
    out = out or console
    if table.title:
        out.print(str(table.title), style=table.title_style or "table.title", highlight=False, markup=False)
    fits = [_fit(out, column, index > 0 and column.overflow == "fold") for index, column in enumerate(table.columns)]
    body = _variant(table, fits, [None] * len(fits), {})
    natural = _measure(out, body).maximum
    given_up: list[str] = []
    if natural <= out.width:
        out.print(body)
    elif not out.is_terminal:
        # (rich types the color_system property as str, the argument as a Literal of the same names.)
        Console(file=out.file, width=natural, color_system=out.color_system, force_terminal=False,  # type: ignore[arg-type]
                no_color=out.no_color, highlight=False).print(body)
    else:
        tables, given_up = _narrow(out, table, fits)
        for part in tables:
            out.print(part, crop=False)
    if table.caption:
        for line in str(table.caption).split("\n"):
            out.print(line, style=table.caption_style or "table.caption", highlight=False, markup=False)
    if given_up:
        out.print(f"narrow terminal ({out.width} columns): {'; '.join(given_up)}; {hint}", style="dim", highlight=False,
                  markup=False)
