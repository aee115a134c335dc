"""The CUDA caching allocator's settings (``PYTORCH_CUDA_ALLOC_CONF``): what ``run --allocator``
puts in the cells' environment, what each cell records, and how readers name it.

Import-light (no torch): the runner builds the cells' environment from it and the report
names a result's setting with it. The allocator reads the variable once, when the process
first initialises CUDA, so it must be in a cell's environment before that: the runner puts
it there when it starts the cell's process (``run.request.RunRequest.cell_environment``).

Segments: the allocator reserves memory in segments (cudaMalloc'd blocks, or with
``expandable_segments`` growable virtual ranges) and caches them. Two runs with the same
tensors can hold different segments, so their reserved and NVML peaks can differ by one
whole segment; ``segment_sizes`` turns a ``torch.cuda.memory_snapshot()`` into the sizes a
result records, and ``caching_note`` says when a cell's reserve is the allocator's caching.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable, Mapping

from ..units import MIB

#: The variable PyTorch's CUDA caching allocator reads its settings from.
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
#: What the runner tells a cell about the setting it made (JSON: the option and the inherited value).
ALLOCATOR_OPTION_ENV = "GPUTECH_BENCH_ALLOCATOR"
#: ``run --allocator``: ``default`` leaves the inherited environment alone.
DEFAULT, EXPANDABLE = "default", "expandable"
ALLOCATOR_CHOICES = (DEFAULT, EXPANDABLE)
EXPANDABLE_KEY = "expandable_segments"
NOT_RECORDED = "not recorded (results written before the allocator setting was recorded)"
NO_EFFECT_ON_CPU = "--allocator has no effect on CPU: PYTORCH_CUDA_ALLOC_CONF configures the CUDA allocator only"


def check_choice(choice: str) -> str:
    if choice not in ALLOCATOR_CHOICES:
        raise ValueError(f"unknown --allocator '{choice}': choose one of {', '.join(ALLOCATOR_CHOICES)}")
    return choice


def split_options(conf: str) -> list[str]:
    """``key:value`` options of a conf, split at the commas outside brackets
    (``roundup_power2_divisions:[256:1,512:2]`` is one option)."""
    options, depth, current = [], 0, ""
    for char in conf:
        depth += (char == "[") - (char == "]")
        if char == "," and depth <= 0:
            options.append(current.strip())
            current = ""
        else:
            current += char
    options.append(current.strip())
    return [option for option in options if option]


def merge_conf(inherited: str | None, choice: str) -> str | None:
    """The conf a cell runs under: ``inherited`` untouched for ``default``; for ``expandable``,
    ``expandable_segments:True`` in place of any inherited value of that key, the user's other
    options kept in their order."""
    check_choice(choice)
    if choice == DEFAULT:
        return inherited
    kept = [option for option in split_options(inherited or "")
            if option.split(":", 1)[0].strip() != EXPANDABLE_KEY]
    return ",".join([*kept, f"{EXPANDABLE_KEY}:True"])


def cell_environment(choice: str, inherited: Mapping[str, str]) -> dict[str, str]:
    """The variables ``run --allocator choice`` sets in every cell's process, over ``inherited``
    (the runner's environment): none for ``default``."""
    if check_choice(choice) == DEFAULT:
        return {}
    before = inherited.get(ALLOC_CONF_ENV)
    conf = merge_conf(before, choice)
    assert conf is not None
    return {ALLOC_CONF_ENV: conf, ALLOCATOR_OPTION_ENV: json.dumps({"option": choice, "inherited": before})}


def recorded_setting(environ: Mapping[str, str]) -> dict[str, Any]:
    """What a cell records (``CellResult.allocator``): the conf in effect in its process
    (None: unset, PyTorch's default), the ``--allocator`` option, and the conf it inherited."""
    conf = environ.get(ALLOC_CONF_ENV) or None
    try:
        told = json.loads(environ.get(ALLOCATOR_OPTION_ENV, "") or "{}")
    except json.JSONDecodeError:
        told = {}
    told = told if isinstance(told, dict) else {}
    option = told.get("option", DEFAULT)
    inherited = told.get("inherited") if option != DEFAULT else conf
    return {"conf": conf, "option": option, "inherited": inherited or None}


def describe(setting: Mapping[str, Any] | None) -> str:
    """A recorded setting in words: ``PYTORCH_CUDA_ALLOC_CONF=... (set by --allocator expandable)``."""
    if not setting:
        return NOT_RECORDED
    conf, option, inherited = setting.get("conf"), setting.get("option", DEFAULT), setting.get("inherited")
    if not conf:
        return f"PyTorch's default ({ALLOC_CONF_ENV} unset)"
    if option == DEFAULT:
        return f"{ALLOC_CONF_ENV}={conf} (inherited from the environment)"
    over = f", over the inherited {ALLOC_CONF_ENV}={inherited}" if inherited else ""
    return f"{ALLOC_CONF_ENV}={conf} (set by --allocator {option}{over})"


# --------------------------------------------------------------------------- segments


def segment_sizes(snapshot: Iterable[Mapping[str, Any]]) -> list[list[float]]:
    """The reserved segments of ``torch.cuda.memory_snapshot()`` (each with ``total_size`` in
    bytes) as ``[size_mib, count]`` pairs, largest first."""
    counts = Counter(int(segment["total_size"]) for segment in snapshot)
    return [[round(size / MIB, 3), count] for size, count in sorted(counts.items(), reverse=True)]


def segments_text(segments: Iterable[Iterable[float]]) -> str:
    """``4 x 2,342 MiB, 1 x 440 MiB``: every segment size, largest first, none left out."""
    return ", ".join(f"{int(count)} x {_mib(size)}" for size, count in segments)


def _mib(value: float) -> str:
    return f"{value:,.0f} MiB" if value >= 10 else f"{value:,.1f} MiB"


def caching_excess(allocated_mib: float | None, reserved_mib: float | None,
                   largest_segment_mib: float | None) -> float | None:
    """How far the reserved peak is above the allocated peak when that is more than the largest
    segment (the largest single allocation the allocator had to find room for, bounded by the
    largest segment recorded): then the excess is the allocator's caching, not tensors. None otherwise."""
    if allocated_mib is None or reserved_mib is None or largest_segment_mib is None:
        return None
    excess = reserved_mib - allocated_mib
    return excess if excess > largest_segment_mib else None


def caching_note(cell: str, allocated_mib: float, reserved_mib: float, segments: list[list[float]]) -> str | None:
    """The line under a table for a cell whose reserve is mostly caching; None when it is not."""
    if not segments:
        return None
    excess = caching_excess(allocated_mib, reserved_mib, segments[0][0])
    if excess is None:
        return None
    return (f"{cell}: reserved {_mib(reserved_mib)} is {_mib(excess)} above allocated {_mib(allocated_mib)}, more than "
            f"its largest segment ({_mib(segments[0][0])}): allocator caching, not tensors (segments: "
            f"{segments_text(segments)}); compare strategies on allocated")
