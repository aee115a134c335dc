"""A cell's start-up: what a worker imports, and the fork server that preloads it once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gputech_bench.training.schedule import linear_schedule_with_warmup


def imported_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    return set(json.loads(process.stdout.splitlines()[-1]))


def test_the_schedule_is_transformers_linear_warmup_step_for_step():
    from transformers.optimization import get_linear_schedule_with_warmup

    for warmup, total in ((0, 2), (3, 10), (11, 114), (0, 1)):
        ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
        mine, reference = linear_schedule_with_warmup(ours, warmup, total), get_linear_schedule_with_warmup(theirs, warmup, total)
        for _ in range(total + 2):
            assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
            ours.step(), theirs.step(), mine.step(), reference.step()


@pytest.mark.slow
def test_the_fork_server_preloads_bert_but_neither_peft_nor_bitsandbytes_nor_the_trainer():
    # What the fork server imports once is what every default (BERT) cell would otherwise import itself.
    from gputech_bench.api._run import FORK_SERVER_PRELOAD  # what a run hands its fork server

    modules = imported_after(f"import importlib; [importlib.import_module(m) for m in {list(FORK_SERVER_PRELOAD)!r}]")
    assert {"gputech_bench.worker.cell", "transformers.models.bert.modeling_bert"} <= modules
    assert not {"peft", "bitsandbytes", "transformers.trainer_utils", "transformers.optimization"} & modules


def test_the_tokenizer_module_imports_neither_tokenizers_nor_transformers():
    modules = imported_after("import gputech_bench.data.tokenizer")
    assert not {"tokenizers", "transformers"} & modules
