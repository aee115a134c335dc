"""Which cells a run holds: the seed's matrix, or the user's list plus the baseline."""

from __future__ import annotations

from ..config import REFERENCE_MATRIX, BenchConfig
from ..errors import StrategyError
from ..modeling import CLM, model_task
from ..strategies import BASELINE, launch_refusal, parse_cell, registered

def matrix_cells(config: BenchConfig) -> list[str]:
    """The cells of ``--matrix``: the seed's, plus for a causal LM each strategy that declares
    ``in_causal_lm_matrix`` (QLoRA, what most people fine-tuning a decoder reach for first);
    a masked-LM keeps the seed's table exactly."""
    cells = list(REFERENCE_MATRIX)
    if config.model.pretrained and model_task(config.model) == CLM:
        cells += [cls.key for cls in registered() if cls.in_causal_lm_matrix and cls.key not in cells]
    return cells


def expand(strategies: str | None, matrix: bool, config: BenchConfig, cuda: bool | None = None) -> list[str]:
    """Canonical cell names in run order; refuses bad names and combinations before anything runs.

    ``--matrix`` gives the seed's eight cells; ``--strategies "1,3,1+2+3"`` gives those
    cells after the baseline, which every comparison needs. Both may be given. With ``cuda``
    False, cells that need a CUDA device are refused.
    """
    requested: list[str] = []
    if matrix or not strategies:
        requested += matrix_cells(config)
    if strategies is not None:
        items = [item.strip() for item in strategies.split(",")]
        if not any(items):
            raise StrategyError("--strategies is empty: list cells such as '1,3,1+2+3'")
        if any(not item for item in items):
            raise StrategyError(f"--strategies '{strategies}' has an empty entry: separate cells with single commas")
        requested = [BASELINE, *requested, *items]
    cells: list[str] = []
    for item in requested:
        cell = parse_cell(item)
        try:
            launch_refusal(cell, config, cuda)
        except StrategyError as error:
            message = str(error).removeprefix("refused combination: ")
            raise StrategyError(f"refused cell '{item}': {message}") from None
        if cell.name not in cells:
            cells.append(cell.name)
    return cells
