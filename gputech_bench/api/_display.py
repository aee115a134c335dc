"""How the API's objects show in a notebook: rich renderables as HTML, figures inline.

A notebook asks an object for ``_repr_html_``; the terminal's tables are rich renderables,
so they are recorded by a console that writes nowhere and exported as HTML with inline
styles (the same colours a terminal shows, no stylesheet to fetch).
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

#: The <pre> rich's own notebook output uses: one monospace block, never wrapped.
PRE = ('<pre style="white-space:pre;overflow-x:auto;line-height:normal;'
       "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">{code}</pre>")
#: Wide enough that a table takes its natural width: nothing in it folds.
NATURAL_WIDTH = 1000


def _recorder(width: int) -> Console:
    return Console(record=True, file=io.StringIO(), width=width, force_terminal=True, force_jupyter=False,
                   color_system="truecolor", highlight=False)


def rich_html(*renderables: Any, width: int = NATURAL_WIDTH) -> str:
    """``renderables`` (tables, markup strings) as one HTML ``<pre>`` block with inline styles."""
    out = _recorder(width)
    for renderable in renderables:
        out.print(renderable, crop=False)
    return out.export_html(inline_styles=True, code_format=PRE)


def text_html(text: str) -> str:
    """Plain text (markdown) as one HTML ``<pre>`` block, for ``_repr_html_``."""
    import html

    return PRE.format(code=html.escape(text))


def show_figures_inline() -> None:
    """Let IPython show a bare matplotlib ``Figure`` as a PNG.

    The plots are made without pyplot (no global state; see report/plots.py), and IPython only
    formats figures once pyplot's inline backend is active. Registered only where nothing
    formats figures yet, so that a user's own matplotlib set-up is left as it is."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    from ..report.plots import png_bytes

    formatter = shell.display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, png_bytes)
