"""What a run is, as one frozen object: the config, its cells, how each cell is launched,
how often and for how long, the folder the results go to, and its shard of a split matrix.

``api.run_matrix`` and ``fit(verify=True)`` build a :class:`RunRequest` once; the runner
(``runner.run_cells``) and each cell's worker (``runner.run_worker``) read what they need
from it instead of a dozen arguments threaded by hand. A request is checked when it is
built, so that a bad one is refused before any process starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..config import BenchConfig
from ..errors import ConfigError
from ..measure.allocator import ALLOCATOR_CHOICES, DEFAULT, cell_environment
from ..results import RunFolder
from .launch import Launch, Slot
from .shard import Sharding


@dataclass(frozen=True)
class CellPlacement:
    """Where the cells run: torchrun's options for each cell (``launch``) and the slots
    (GPUs, ``--gpus``) that cells share, one cell per slot at a time."""

    launch: Launch
    #: ``(None,)``: one slot that inherits the runner's devices.
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        if not self.slots:
            raise ConfigError("a run needs at least one slot: pass --gpus with at least one GPU, or leave it out")


@dataclass(frozen=True)
class Schedule:
    """How often and for how long each cell runs, and whether finished cells are run again."""

    #: Every cell this many times, round-robin (``--repeat``).
    repeats: int
    #: train.seed of each repeat (``repeats`` of them); None runs every cell once with the config's own seed.
    seeds: tuple[int, ...] | None
    #: Whether the seeds step from repeat to repeat (``--vary-seed``): said when the run starts.
    vary_seed: bool
    #: Seconds a cell may run before it is stopped and recorded as ``timeout``; None: no limit.
    cell_timeout: float | None
    #: Re-run the cells an earlier attempt of this run had finished (``--force``).
    force: bool

    def __post_init__(self) -> None:
        if self.seeds is not None and len(self.seeds) != self.repeats:
            raise ConfigError(f"{len(self.seeds)} seed(s) for --repeat {self.repeats}: give one per repeat")


@dataclass(frozen=True)
class RunRequest:
    """One run: ``cells`` of ``config`` into ``folder``, placed and scheduled as asked."""

    config: BenchConfig
    #: Canonical cell names, in run order (``run.matrix.expand``).
    cells: tuple[str, ...]
    placement: CellPlacement
    schedule: Schedule
    folder: RunFolder
    #: The CUDA caching allocator's setting for every cell (``run --allocator``): ``default``
    #: leaves the inherited PYTORCH_CUDA_ALLOC_CONF alone, ``expandable`` sets expandable_segments:True.
    allocator: str = DEFAULT
    #: This run's slice of a matrix split over machines (``--shard K/N``): ``cells`` are its
    #: cells, and ``folder`` is the shard's view of the shared run folder. None: not split.
    sharding: Sharding | None = None

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATOR_CHOICES:
            raise ConfigError(f"unknown --allocator '{self.allocator}': choose one of {', '.join(ALLOCATOR_CHOICES)}")
        if self.sharding is not None and self.cells != self.sharding.cells:
            raise ConfigError(f"shard {self.sharding.shard.label}: its cells are {', '.join(self.sharding.cells)}, "
                              f"not {', '.join(self.cells)}")

    def cell_environment(self, inherited: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables every cell's process gets over ``inherited`` (the runner's environment),
        whichever launcher starts it: the allocator's settings."""
        return cell_environment(self.allocator, os.environ if inherited is None else inherited)

    @property
    def launch(self) -> Launch:
        return self.placement.launch

    @property
    def slots(self) -> tuple[Slot, ...]:
        return self.placement.slots

    @property
    def name(self) -> str:
        """The run's name: its folder's."""
        return self.folder.root.name
