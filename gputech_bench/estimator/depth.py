"""A deep model's rank, traced at two shallow depths and extrapolated to its own.

fit weighs hundreds of setups. For one rank of a 70B shape, a traced step costs seconds per
block (FSDP2's DTensor dispatch on fake tensors), so a search that traces all 80 blocks of
every candidate does not answer in minutes. The blocks are alike, though: each adds the same
parameters, gradients and optimizer state (sharded or not), the same saved activations and
the same gathered units in flight. So at any given *moment* of the step, every figure is a
straight line in the number of blocks, and two traces give the line.

The step's peak is not one moment, though. It is the largest of all of them, and which one
is largest can change with depth: at 3 blocks the loss's logits may top the step, at 80
the optimizer step, where every gradient shard is live. Extrapolating the peak itself would
follow the wrong line. So every operator of the measured step is filed under *where* it
runs, in words that do not depend on the depth (:class:`StepPosition`): the pass (forward,
backward or optimizer step, counted in order) and the position in the block stack (before
the first block, in the first, in a middle one, between two, in the last, or after the
last). Within a pass the blocks repeat the same work, so across the middle blocks the bytes
move along a line too, and their largest moment sits at one end of them: the same moment at
any depth of 3 blocks or more. Each moment's bytes are extrapolated from the traces at 3 and 4 blocks,
and the peak at the model's depth is the largest extrapolated moment.

``tests/test_depth.py`` checks it against whole traces: the extrapolated peak of a deeper
model equals its traced peak, category by category.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from ..config import BenchConfig, apply_overrides
from ..measure.tracker import StepMemoryTracker, TrackedPeak
from .reserved import ReservedRange

#: The depths traced: 3 is the fewest with a middle block, so that every position exists in both.
SHALLOW_BLOCKS = (3, 4)
#: Models with fewer blocks are traced whole: two shallow traces would cost about as much.
EXTRAPOLATED_FROM = 8

#: Where an operator ran: (device, pass number, pass, position in the block stack).
Moment = tuple[str, int, str, str]
#: Each moment's largest live bytes: (total, bytes by category).
Moments = dict[Moment, tuple[int, dict[str, int]]]


class DepthError(Exception):
    """The two shallow traces do not line up (different moments): trace the model whole."""


class StepPosition:
    """Where in the step the current operator runs, in terms that do not depend on the depth.

    Reads the tracker's module tracker (which modules are running, and whether in backward)
    and its optimizer flag. A checkpointed block's recomputation runs in backward and counts
    there, under its block; an optimizer stepped in backward (optimizer-in-backward) counts as
    backward, so that the number of passes does not grow with the blocks."""

    def __init__(self, tracker: StepMemoryTracker, blocks: Sequence[nn.Module]) -> None:
        self._tracker = tracker
        self._blocks = list(blocks)
        self._names: dict[str, int] = {}
        self._pass, self._phase = 0, ""
        #: The block the pass ran in last (its index), None before the first.
        self._last_block: int | None = None

    def _block_names(self) -> dict[str, int]:
        # ModTracker names a module once its parent has run: look them up until all are known.
        if len(self._names) < len(self._blocks):
            known = self._tracker.modules.get_known_fqn
            self._names = {name: index for index, block in enumerate(self._blocks) if (name := known(block))}
        return self._names

    def __call__(self) -> tuple[int, str, str]:
        modules = self._tracker.modules
        phase = "backward" if modules.is_bw else "optimizer" if self._tracker.in_optimizer_step else "forward"
        if phase != self._phase:
            self._pass, self._phase, self._last_block = self._pass + 1, phase, None
        names = self._block_names()
        indices = [names[name] for name in modules.parents if name in names]
        last = len(self._blocks) - 1
        if indices:
            self._last_block = index = indices[0]
            return self._pass, phase, "first block" if index == 0 else "last block" if index == last else "middle block"
        if self._last_block is None:
            return self._pass, phase, "before blocks"
        # Between two blocks (FSDP's hooks run there) is a moment of its own, as a middle block is.
        final = 0 if phase == "backward" else last  # backward visits the blocks from the last one
        return self._pass, phase, "after blocks" if self._last_block == final else "between blocks"


@dataclass(frozen=True)
class Depth:
    """A model of ``blocks`` blocks, traced at ``shallow`` depths instead."""

    blocks: int
    shallow: tuple[int, int] = SHALLOW_BLOCKS

    @property
    def steps(self) -> int:
        """Blocks between the deeper shallow trace and the model."""
        return self.blocks - self.shallow[1]

    def config(self, config: BenchConfig, blocks: int) -> BenchConfig:
        return apply_overrides(config, [f"model.num_layers={blocks}"])

    def describe(self) -> str:
        return (f"traced at {self.shallow[0]} and {self.shallow[1]} blocks and extrapolated to {self.blocks}, "
                "moment by moment of the step (each moment's bytes are linear in the blocks)")

    def describe_modelled(self) -> str:
        return (f"modelled at {self.shallow[0]} and {self.shallow[1]} blocks and extrapolated to {self.blocks} along "
                "the modelled peak's own line (a model has no moments to follow: low if a deeper model peaks at "
                "another moment)")


def depth_to_extrapolate(blocks: int) -> Depth | None:
    """The extrapolation for a model of ``blocks`` blocks, or None when it is traced whole."""
    return Depth(blocks) if blocks >= EXTRAPOLATED_FROM else None


def _line(shallow: int, deep: int, steps: int) -> int:
    return max(0, deep + steps * (deep - shallow))


def _categories(shallow: dict[str, int], deep: dict[str, int], steps: int) -> dict[str, int]:
    return {name: _line(shallow.get(name, 0), deep.get(name, 0), steps) for name in sorted({*shallow, *deep})}


def extrapolate_peak(shallow: TrackedPeak, deep: TrackedPeak, steps: int) -> TrackedPeak:
    """One figure's line through two depths (a modelled figure's, which has no moments)."""
    return TrackedPeak(deep.device, _line(shallow.total_bytes, deep.total_bytes, steps),
                       _categories(shallow.by_category, deep.by_category, steps))


def peak_of_moments(shallow: Moments, deep: Moments, device: str, steps: int) -> TrackedPeak | None:
    """The largest moment on ``device`` once each is extrapolated ``steps`` blocks deeper;
    None when neither trace had a moment there. Raises DepthError when the moments differ."""
    here = {moment for moment in (*shallow, *deep) if moment[0] == device}
    if not here:
        return None
    unmatched = sorted(moment for moment in here if moment not in shallow or moment not in deep)
    if unmatched:
        raise DepthError(f"the shallow traces' moments differ ({', '.join(map(str, unmatched[:3]))})")
    best: TrackedPeak | None = None
    for moment in sorted(here):
        (low_total, low), (high_total, high) = shallow[moment], deep[moment]
        peak = TrackedPeak(device, _line(low_total, high_total, steps), _categories(low, high, steps))
        if best is None or peak.total_bytes > best.total_bytes:
            best = peak
    return best


def extrapolate_reserved(deep: ReservedRange | None, deep_tensors: int, tensors: int, depth: Depth) -> ReservedRange | None:
    """The allocator's reserve at the model's depth: the deeper replay's bytes beyond its tensors,
    kept on top of the extrapolated tensor peak.

    Not a line through the two replays: a replay's cached bytes move by whole segments from one
    depth to the next (a 70B rank's fsdp replay reserves 13.0 GB beyond its tensors at 3 blocks,
    7.7 GB at 4, 11.6 GB at 5), and a line through two of them, carried 76 blocks on, would
    multiply that noise by 76. What sets the cached bytes (the largest blocks: logits, the
    gathered root) does not grow with the blocks."""
    if deep is None:
        return None
    shift = tensors - deep_tensors
    why = (f"the allocator's bytes beyond the tensors as replayed at {depth.shallow[1]} blocks, kept at "
           f"{depth.blocks}")
    return dataclasses.replace(
        deep, traced_bytes=deep.traced_bytes + shift, low_bytes=deep.low_bytes + shift,
        high_bytes=deep.high_bytes + shift, allocated_bytes=deep.allocated_bytes + shift,
        why=why if deep.why is None else f"{why}; {deep.why}",
        workspaces=f"{deep.workspaces}; replayed at {depth.shallow[1]} blocks",
    )


def depth_facts(facts: dict[str, Any], how: str, seconds: tuple[float, float]) -> dict[str, Any]:
    return {**facts, "depth": how, "shallow_trace_seconds": [round(seconds[0], 3), round(seconds[1], 3)]}
