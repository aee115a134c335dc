"""Statistics of repeated measurements: median, range, outliers, and "within noise".

Outliers follow hyperfine (after Iglewicz and Hoaglin): a value's modified Z-score is
its distance from the median in median absolute deviations (MAD); beyond 1.4826 x 10
(ten standard deviations of a normal sample, the MAD scaled to one) it is flagged. It is
flagged, never dropped silently: the values stay in the result.

Two sets of repeats differ beyond noise only when their ranges (outliers left out) do not
overlap. With a handful of repeats this is a conservative rule, and an honest one: it
makes no assumption about the distribution that five samples could not back.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Sequence

#: Modified Z-score beyond which a value is an outlier: the MAD scaled to a standard
#: deviation (1.4826), times ten, as hyperfine uses.
OUTLIER_THRESHOLD = 1.4826 * 10.0

WITHIN_NOISE = "within noise"
LOWER = "lower"
HIGHER = "higher"
SINGLE_RUN = "single run"


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]
    median: float
    minimum: float
    maximum: float
    mad: float
    outliers: tuple[int, ...]  # indices into values

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def spread(self) -> float:
        return self.maximum - self.minimum

    def kept(self) -> list[float]:
        """The values that are not outliers."""
        return [value for index, value in enumerate(self.values) if index not in self.outliers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "median": self.median, "min": self.minimum, "max": self.maximum, "spread": self.spread,
            "mad": self.mad, "outliers": list(self.outliers), "values": list(self.values),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Summary":
        return cls(tuple(data["values"]), data["median"], data["min"], data["max"], data["mad"], tuple(data["outliers"]))


def modified_zscores(values: Sequence[float]) -> list[float]:
    median = statistics.median(values)
    mad = statistics.median(abs(value - median) for value in values)
    # All values but a few equal: MAD is 0, and any value off the median stands out.
    scale = mad if mad > 0 else 2.220446049250313e-16
    return [(value - median) / scale for value in values]


def summarize(values: Sequence[float]) -> Summary | None:
    """Median, range, MAD and outliers of the values; None when there are none."""
    values = tuple(float(value) for value in values)
    if not values:
        return None
    median = statistics.median(values)
    mad = statistics.median(abs(value - median) for value in values)
    outliers = tuple(index for index, score in enumerate(modified_zscores(values)) if abs(score) > OUTLIER_THRESHOLD)
    return Summary(values, median, min(values), max(values), mad, outliers)


def versus(candidate: Summary, reference: Summary) -> str:
    """Whether ``candidate`` is clearly lower or higher than ``reference``, or within noise.

    Needs two values on each side: one value has no spread to judge against."""
    if candidate.n < 2 or reference.n < 2:
        return SINGLE_RUN
    a, b = candidate.kept(), reference.kept()
    if max(a) < min(b):
        return LOWER
    if min(a) > max(b):
        return HIGHER
    return WITHIN_NOISE
