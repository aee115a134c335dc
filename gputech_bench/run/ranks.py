"""The ranks of a torchrun cell (``--nproc-per-node``): which ranks this node runs, and
their result files read back for ``results.merge_ranks``.

Every rank writes its own result under ``RUN/ranks/``; the runner merges them into the
cell's one result (memory the largest rank's, time and accuracy the lowest rank's).
"""

from __future__ import annotations

from typing import Any

from ..errors import ResultError
from ..results import CellResult, RunFolder, read_result
from .launch import Launch


def expected_ranks(launch: Launch) -> list[int]:
    """The global ranks this node runs (torchrun numbers them node by node)."""
    first = launch.node_rank * launch.nproc_per_node
    return list(range(first, first + launch.nproc_per_node))


def describe_launch(launch: Launch) -> dict[str, Any]:
    """How the cell was launched, for the merged result."""
    return {
        "world_size": launch.world_size,
        "nnodes": launch.nnodes,
        "nproc_per_node": launch.nproc_per_node,
        "node_rank": launch.node_rank,
    }


def clear_rank_results(folder: RunFolder, label: str) -> None:
    """Remove an earlier attempt's rank files, so that a merge reads this attempt's only."""
    for path in folder.rank_paths(label):
        path.unlink(missing_ok=True)


def read_rank_results(folder: RunFolder, label: str, launch: Launch) -> list[CellResult]:
    """This node's rank results; a rank that left none becomes a ``crashed`` row of its own."""
    results = []
    for rank in expected_ranks(launch):
        path = folder.rank_path(label, rank)
        try:
            result = read_result(path)
        except ResultError:
            result = CellResult.failed(label, "crashed", f"left no result ({path.name}); see the cell's log")
        result.rank = result.rank or {"rank": rank, "world_size": launch.world_size}
        results.append(result)
    return results
