"""From a call's options to a resolved config and its cells, the same way for the command
line and the API: :class:`Selection`, shared by ``run_matrix``, ``estimate`` and ``fit``.

``overrides`` are what ``--set`` gives: a list of ``section.key=value`` strings from the
command line, or a dict from Python (``{"train.max_steps": 4}``). A dict's values are turned
into the text ``--set`` would take, so both go through one parser and one set of checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..config import OBJECTIVES_OF_TASK, BenchConfig, apply_overrides, default_preset_name, load_preset
from ..errors import ConfigError, DeviceError
from ..measure import gpu_busy
from ._output import Output

Overrides = Union[Mapping[str, Any], Iterable[str], None]


def cuda_available() -> bool:
    # Ask NVML rather than creating a CUDA context: the runner must leave the GPU untouched.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


def uses_cuda(config: BenchConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and cuda_available())


def _override_text(key: Any, value: Any) -> str:
    """``key=value`` as ``--set`` takes it; refuses values that ``--set`` could not express."""
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"overrides keys are setting names such as 'train.max_steps', got {key!r}")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    elif isinstance(value, (list, tuple)) and all(isinstance(item, (int, float, str)) for item in value):
        text = ",".join(str(item) for item in value)
    else:
        raise ConfigError(f"overrides['{key}'] = {value!r}: pass a number, a string, true/false or a list of those")
    return f"{key}={text}"


def override_texts(overrides: Overrides) -> list[str]:
    """``--set`` strings from a dict (the API) or a list of strings (the command line)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [_override_text(key, value) for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r}: pass a dict such as {{'train.max_steps': 4}} or a list of 'key=value'")
    texts = list(overrides)
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"overrides as a list hold 'section.key=value' strings, got {text!r}")
    return texts


def check_text_file(option: str, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{option} '{path}' is not a file: pass a text file with one sentence per line")
    try:
        with path.open(encoding="utf-8") as handle:
            has_text = any(line.strip() for line in handle)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{option} '{path}' cannot be read as UTF-8 text ({type(error).__name__}): save it as UTF-8") from None
    if not has_text:
        raise ConfigError(f"{option} '{path}' is empty: put one sentence per line in it")


def resolve_config(
    preset: Optional[str],
    overrides: Overrides,
    model: Optional[str],
    train_file: Optional[Path],
    eval_file: Optional[Path],
    device: str,
    output: Output,
) -> BenchConfig:
    """The preset (default: ``seed`` with CUDA, ``cpu`` without), then the device, model and
    files, then the overrides; says which preset it picked when none was named."""
    if device == "cuda" and not cuda_available():
        raise ConfigError(
            "--device cuda was given but torch.cuda.is_available() is False: use --device cpu, "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    name = preset or default_preset_name(cuda_available() and device != "cpu")
    if preset is None:
        why = "a CUDA device is available" if name == "seed" else "no CUDA device in use; --preset seed runs the seed's full setup"
        output.say(f"preset [bold]{name}[/] ({why})")
    config = load_preset(name)
    texts = [f"device={device}"]
    if model:
        texts.append(f"model.pretrained={model}")
    train_file = Path(train_file) if train_file is not None else None
    eval_file = Path(eval_file) if eval_file is not None else None
    for option, path in (("--train-file", train_file), ("--eval-file", eval_file)):
        if path is not None:
            check_text_file(option, path)
    if train_file:
        # A user's file is used whole unless --set data.train_sentences=N says otherwise.
        texts += [f"data.train_file={train_file.resolve()}", "data.train_sentences=0"]
    if eval_file:
        texts.append(f"data.eval_file={eval_file.resolve()}")
    sets = override_texts(overrides)
    config = objective_for_model(apply_overrides(config, texts + sets), sets, output)
    if config.model.pretrained and config.model.overrides:
        from ..modeling import check_model_overrides

        check_model_overrides(config.model)  # a shape the checkpoint cannot take is refused before any process starts
    return config


def strategies_text(strategies: Union[str, Sequence[str], None]) -> Optional[str]:
    """The command line's comma-separated cells from a list (the API) or a string (either)."""
    if strategies is None or isinstance(strategies, str):
        return strategies
    items = list(strategies)
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"strategies={strategies!r}: pass cell names such as ['1', '1+2+3'] or '1,1+2+3'")
    if not items:
        raise ConfigError("strategies=[] is empty: list cells such as ['1', '3', '1+2+3'], or pass matrix=True")
    return ",".join(items)


@dataclass(frozen=True)
class Selection:
    """What a call runs, traces or searches, as the user named it: the config (a preset, the
    --set overrides, a model, text files and the device) and the cells (``--strategies``,
    ``--matrix``). Written once for ``run_matrix``, ``estimate`` and ``fit``; each field is
    checked where it is resolved, in the order the command line always checked them."""

    strategies: Union[str, Sequence[str], None]
    matrix: bool
    preset: Optional[str]
    overrides: Overrides
    model: Optional[str]
    train_file: Optional[Path]
    eval_file: Optional[Path]
    device: str

    def config(self, output: Output) -> BenchConfig:
        """The resolved config (see ``resolve_config``)."""
        return resolve_config(self.preset, self.overrides, self.model, self.train_file, self.eval_file, self.device, output)

    def cells(self, config: BenchConfig, cuda: Optional[bool] = None) -> list[str]:
        """Canonical cell names in run order; with ``cuda`` False, cells that need CUDA are refused."""
        from ..run.matrix import expand  # the strategies import torch: not on the command line's start-up path

        return expand(strategies_text(self.strategies), self.matrix, config, cuda)

    @property
    def names_cells(self) -> bool:
        """Whether cells were asked for (otherwise ``estimate --compare`` takes the run's)."""
        return bool(strategies_text(self.strategies) or self.matrix)


def objective_for_model(config: BenchConfig, sets: list[str], output: Output) -> BenchConfig:
    """The preset's objective trains the preset's model; a ``--model`` of the other task (a
    causal LM under a BERT preset) gets its task's objective, and the call says so. An
    objective the user set explicitly is never replaced: a mismatch is refused."""
    from ..data.prepare import check_objective
    from ..modeling import TASKS, model_task

    if not config.model.pretrained:
        return config
    task = model_task(config.model)
    if config.data.objective in OBJECTIVES_OF_TASK[task] or any(s.startswith("data.objective=") for s in sets):
        check_objective(config, task)
        return config
    objective = OBJECTIVES_OF_TASK[task][0]
    output.say(f"data.objective={objective}: '{config.model.pretrained}' is a {TASKS[task]}, and the preset's "
               f"{config.data.objective} objective trains the other task")
    return apply_overrides(config, [f"data.objective={objective}"])


def check_gpu_idle(allow_busy: bool, gpus: Optional[str], output: Output) -> None:
    """Refuse to start on a busy GPU; ``gpus`` is --gpus, so that only the run's GPUs count."""

    check = gpu_busy.idle_check(gpus)
    if check.error:
        output.warn(f"NVML failed ({check.error}), so the idle-GPU check was skipped")
    for entry in check.unchecked:
        # A MIG instance, or a number past NVML's count: the worker will say more if it cannot start.
        output.warn(f"NVML lists no GPU '{entry}', so the idle-GPU check skipped it")
    busy = check.busy
    if not busy:
        return
    what = "; ".join(gpu.describe() for gpu in busy)
    if allow_busy:
        output.warn(f"{what}: memory figures include other processes' usage")
        return
    raise DeviceError(f"{what}, so every memory figure would be off: stop those processes, or pass --allow-busy-gpu to run anyway")
