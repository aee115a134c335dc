"""One matrix spread over machines: ``--shard K/N`` -> the K-th of N disjoint slices of the cells.

The cells are dealt round-robin in the matrix's order: cell i (counting from 0) belongs to
shard ``i % N + 1``. The same cell list always gives the same slices, and the baseline,
always first in the list (``matrix.expand``), is run by shard 1. Every shard writes into the
same run folder on a shared filesystem; the first to start records the split in
``shards.json`` (``RunFolder.shard_plan_path``) and every other shard must agree with it:
the same cells, N, repeats and seeds. ``missing`` says which cells of the split have no
result yet, and which shard owns each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

from ..errors import ConfigError
from ..files import create_exclusive_json
from ..results import RunFolder

SCHEMA = "gputech-bench/shards/1"

_SHARD = re.compile(r"^\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (from 1) of ``count`` slices of a run's cells."""

    index: int
    count: int

    @property
    def label(self) -> str:
        """As the user writes it: ``2/3``."""
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """As file names carry it: ``2-of-3``."""
        return f"{self.index}-of-{self.count}"

    def cells(self, cells: Sequence[str]) -> tuple[str, ...]:
        """This shard's cells of ``cells``, in their order: every N-th, from the K-th."""
        return tuple(cells[self.index - 1 :: self.count])


ShardLike = Union[str, Shard, "tuple[int, int]", None]


def parse_shard(value: ShardLike) -> Shard | None:
    """``"2/3"`` (or ``(2, 3)``, or a Shard) -> Shard(2, 3); None stays None. Bad input is one line."""
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        index, count = value
        text = f"{index}/{count}"
    else:
        text = str(value)
        match = _SHARD.match(text)
        if not isinstance(value, str) or not match:
            raise ConfigError(f"--shard '{text}': pass K/N, the K-th of N slices, K from 1 to N (e.g. --shard 1/3)")
        index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text}: N must be at least 1 (e.g. --shard 1/3)")
    if index < 1:
        raise ConfigError(f"--shard {text}: K counts from 1 (1/{count} to {count}/{count}); "
                          "from a 0-based index such as JOB_COMPLETION_INDEX pass $((INDEX + 1))")
    if index > count:
        raise ConfigError(f"--shard {text}: K must be between 1 and {count}")
    return Shard(index, count)


def owner(cells: Sequence[str], cell: str, count: int) -> Shard:
    """The shard that runs ``cell`` when ``cells`` are split ``count`` ways."""
    return Shard(list(cells).index(cell) % count + 1, count)


@dataclass(frozen=True)
class ShardPlan:
    """How a run was split: what every shard of it must agree on."""

    count: int
    #: Every cell of the run, in the matrix's order (the slices are dealt from it).
    cells: tuple[str, ...]
    repeats: int = 1
    #: train.seed of each repeat, None when each cell runs once with the config's seed.
    seeds: tuple[int, ...] | None = None

    def check(self, shard: Shard) -> None:
        if self.count > len(self.cells):
            raise ConfigError(f"--shard {shard.label}: the run has {len(self.cells)} cell(s) "
                              f"({', '.join(self.cells)}), so some shards would have none: split it at most "
                              f"{len(self.cells)} ways")

    def owners(self) -> dict[str, Shard]:
        return {cell: owner(self.cells, cell, self.count) for cell in self.cells}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "count": self.count, "cells": list(self.cells),
            "owners": {cell: shard.index for cell, shard in self.owners().items()},
            "repeats": self.repeats, "seeds": None if self.seeds is None else list(self.seeds),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ShardPlan:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError("not a gputech-bench shard plan")
        seeds = data.get("seeds")
        return cls(int(data["count"]), tuple(str(cell) for cell in data["cells"]), int(data.get("repeats", 1)),
                   None if seeds is None else tuple(int(seed) for seed in seeds))

    def differences(self, other: ShardPlan) -> list[str]:
        """What differs from ``other`` (the recorded plan), as ``what: this, recorded that``."""
        found = []
        if self.count != other.count:
            found.append(f"N {self.count}, recorded {other.count}")
        if self.cells != other.cells:
            found.append(f"cells {','.join(self.cells)}, recorded {','.join(other.cells)}")
        if self.repeats != other.repeats:
            found.append(f"--repeat {self.repeats}, recorded {other.repeats}")
        elif self.seeds != other.seeds:
            found.append("--vary-seed or train.seed differ")
        return found


def read_plan(folder: RunFolder) -> ShardPlan | None:
    """The run's recorded split, or None for a run that was not split (or whose shards.json is unreadable)."""
    try:
        return ShardPlan.from_dict(json.loads(folder.shard_plan_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_plan(folder: RunFolder, plan: ShardPlan, shard: Shard) -> None:
    """Record ``plan`` in the run folder unless a shard did first; then it must be the same plan."""
    plan.check(shard)
    if create_exclusive_json(folder.shard_plan_path, plan.to_dict()):
        return
    recorded = read_plan(folder)
    if recorded is None:
        raise ConfigError(f"{folder.shard_plan_path} is unreadable: delete it once no shard is running, "
                          "or use another --run-name")
    differences = plan.differences(recorded)
    if differences:
        raise ConfigError(
            f"shard {shard.label} does not match the shards already in {folder.root} ({'; '.join(differences)}): "
            "give every shard the same --matrix/--strategies, --repeat and N, or use another --run-name"
        )


def missing(folder: RunFolder, present: Sequence[str]) -> list[tuple[str, Shard]]:
    """The cells of the run's split with no result in ``present``, each with the shard that owns it."""
    plan = read_plan(folder)
    if plan is None:
        return []
    have = set(present)
    return [(cell, shard) for cell, shard in plan.owners().items() if cell not in have]


def missing_line(cells: Sequence[tuple[str, Shard]]) -> str:
    """``missing: 4, lora (shard 2/3); 1+2+4 (shard 3/3)``, the cells grouped by their shard."""
    by_shard: dict[Shard, list[str]] = {}
    for cell, shard in cells:
        by_shard.setdefault(shard, []).append(cell)
    groups = [f"{', '.join(names)} (shard {shard.label})" for shard, names in sorted(by_shard.items(), key=lambda kv: kv[0].index)]
    return "missing: " + "; ".join(groups)


@dataclass(frozen=True)
class Sharding:
    """One shard's part of a split run: which slice it is, and the split it belongs to."""

    shard: Shard
    plan: ShardPlan

    @property
    def cells(self) -> tuple[str, ...]:
        """The cells this shard runs."""
        return self.shard.cells(self.plan.cells)
