"""What every command shares: the consoles, one-line failures, exit codes and the
resolved config. Kept apart from cli.py so that command modules registered on the app
(estimate, fit) can import it without a cycle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ..config import BenchConfig, apply_overrides, default_preset_name, load_preset
from ..errors import ConfigError

EXIT_FAILED_CELL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

console = Console()
errors = Console(stderr=True)


def fail(message: str) -> None:
    """One line naming the problem and the fix, exit status 2, no traceback."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def cuda_available() -> bool:
    # Ask NVML rather than creating a CUDA context: the runner must leave the GPU untouched.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


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
    sets: List[str],
    model: Optional[str],
    train_file: Optional[Path],
    eval_file: Optional[Path],
    device: str,
) -> BenchConfig:
    if device == "cuda" and not cuda_available():
        raise ConfigError(
            "--device cuda was given but torch.cuda.is_available() is False: use --device cpu, "
            "or install a CUDA build of torch on a machine with a GPU"
        )
    name = preset or default_preset_name(cuda_available() and device != "cpu")
    if preset is None:
        why = "a CUDA device is available" if name == "seed" else "no CUDA device in use; --preset seed runs the seed's full setup"
        console.print(f"preset [bold]{name}[/] ({why})", highlight=False)
    config = load_preset(name)
    overrides = [f"device={device}"]
    if model:
        overrides.append(f"model.pretrained={model}")
    for option, path in (("--train-file", train_file), ("--eval-file", eval_file)):
        if path is not None:
            check_text_file(option, path)
    if train_file:
        # A user's file is used whole unless --set data.train_sentences=N says otherwise.
        overrides += [f"data.train_file={train_file.resolve()}", "data.train_sentences=0"]
    if eval_file:
        overrides.append(f"data.eval_file={eval_file.resolve()}")
    return apply_overrides(config, overrides + list(sets))


def uses_cuda(config: BenchConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and cuda_available())
