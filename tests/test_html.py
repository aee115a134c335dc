"""report --format html: one self-contained file, rendered in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gputech_bench.report.export import render
from gputech_bench.results import load_run

FIXTURE = Path(__file__).parent / "fixtures" / "plots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Flags for a closed network and a root user, as Debian's headless Chromium needs them.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--window-size=1200,2400",
]


def html_of(run: str) -> str:
    return render(load_run(FIXTURE / run), "html")


@pytest.mark.parametrize("run", ["cpu", "cuda", "repeats"])
def test_the_html_report_is_self_contained(run: str):
    text = html_of(run)
    # Nothing is fetched: every src/href is a data URI or an in-page anchor, and no URL is written at all.
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert all(ref.startswith(("data:", "#")) for ref in references), references
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text)
    assert "<link" not in text and "<script" not in text and "@import" not in text and "url(" not in text
    assert text.count('src="data:image/png;base64,') >= 2  # memory/time and breakdown
    assert "<h2>Provenance</h2>" in text and "<h2>Resolved config</h2>" in text and '"batch_size"' in text
    assert "<td>baseline</td>" in text


def test_the_accuracy_plot_is_embedded_only_for_repeated_cells():
    assert html_of("repeats").count("data:image/png") == 3
    assert html_of("cpu").count("data:image/png") == 2


def render_in_chromium(page: Path, tmp_path: Path) -> tuple[Path, str]:
    screenshot = tmp_path / "shot.png"
    out = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    return screenshot, out.stderr


def console_errors(log: str) -> list[str]:
    # Chromium logs each console message as 'CONSOLE(line)] "text"'; uncaught errors and
    # failed loads appear there too.
    return [line for line in log.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_report_without_console_errors(tmp_path: Path):
    import matplotlib.image

    page = tmp_path / "report.html"
    page.write_text(html_of("cuda"), encoding="utf-8")
    screenshot, log = render_in_chromium(page, tmp_path)
    assert console_errors(log) == []
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (2400, 1200)
    # Not a blank page: the table, text and plots put dark pixels on it.
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.01

    # The check itself can fail: a page with a script error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    _, log = render_in_chromium(broken, tmp_path)
    assert any("undefinedFunction" in line for line in console_errors(log))
