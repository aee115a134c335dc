"""fsdp-offload trains like the baseline: in one process, and sharded over two gloo ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import context, random_batch, tiny_bert
from torch.distributed.tensor import DTensor
from transformers import get_linear_schedule_with_warmup

from gputech_bench.errors import StrategyError
from gputech_bench.strategies import TrainingPlan, build_plan, device_refusal, distributed, parse_cell
from gputech_bench.strategies.fsdp_offload import FsdpOffload
from gputech_bench.training.loop import accumulate_gradients, optimizer_step

STEPS = 3
BATCH = 8
#: A clip small enough to act on every step: a norm taken over one rank's shards
#: alone would scale the steps differently.
# mlm: the batches label the masked positions only, and sparse-head needs that objective.
OVERRIDES = (f"train.batch_size={BATCH}", "train.max_grad_norm=0.05", "train.lr=1e-3", "data.objective=mlm")
WORLD_SIZE = 2
SPAWN_DEADLINE_S = 120


def batch(step: int) -> dict[str, torch.Tensor]:
    # Every row holds the same number of targets, so the mean of the ranks' half-batch
    # losses (and gradients) is the full batch's.
    return random_batch(BATCH, 16, 300, seed=step, mask_every=4)


def rows(full: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    return {name: tensor[part] for name, tensor in full.items()}


def train(cell: str, part: slice = slice(None)) -> tuple[TrainingPlan, list[float]]:
    """STEPS optimizer steps on ``part`` of each batch, then the gradients of one more batch."""
    ctx = context(*OVERRIDES)
    plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    losses = [float(optimizer_step(plan, scheduler, rows(batch(step), part), ctx)) for step in range(STEPS)]
    accumulate_gradients(plan, rows(batch(STEPS), part), ctx.device)
    return plan, losses


def full_gradients(plan: TrainingPlan) -> dict[str, torch.Tensor]:
    """Every gradient whole; gathering a sharded one is a collective all ranks join."""
    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        for name, p in plan.model.named_parameters()
        if p.grad is not None
    }


def assert_same_gradients(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Equal within fp32 round-off, the floor relative to the largest gradient (some are zero
    in exact arithmetic and hold only noise)."""
    assert actual.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.fixture()
def process_group():
    """Each test starts without a group and leaves none behind."""
    assert not dist.is_initialized()
    yield
    distributed.shutdown()
    assert not dist.is_initialized()


def test_world_size_1_trains_exactly_like_the_baseline_from_host_dtensors(process_group):
    baseline, expected = train("baseline")
    plan, losses = train("fsdp-offload")
    assert losses == pytest.approx(expected, abs=1e-6)
    assert_same_gradients(full_gradients(baseline), full_gradients(plan))

    assert dist.get_world_size() == 1
    params = plan.placement.optimizer_parameters()
    assert params and all(isinstance(p, DTensor) and p.to_local().device.type == "cpu" for p in params)
    assert plan.placement.clips_gradients and plan.facts["gradient_clipping"]
    assert plan.facts["fsdp_world_size"] == 1
    assert plan.facts["total_parameters"] == baseline.facts["total_parameters"]  # DTensors count their global size
    bert = plan.model
    assert bert.bert.embeddings.word_embeddings.weight is bert.cls.predictions.decoder.weight  # still tied

    distributed.shutdown()
    distributed.shutdown()  # a second call is harmless
    assert not dist.is_initialized()


def offload_units(model: torch.nn.Module) -> dict[str, list]:
    """Each FSDP unit of ``model`` (by module name) and the parameter groups FSDP keeps for it."""
    from torch.distributed.fsdp import FSDPModule

    return {
        name: module._get_fsdp_state()._fsdp_param_groups
        for name, module in model.named_modules()
        if isinstance(module, FSDPModule)
    }


def test_every_unit_holds_a_cpu_offload_policy_over_all_the_parameters(process_group):
    from torch.distributed.fsdp import CPUOffloadPolicy

    plan = build_plan(parse_cell("fsdp-offload"), tiny_bert(), context(*OVERRIDES))
    units = offload_units(plan.model)
    # The two BertLayers, then the root.
    assert sorted(units) == ["", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    groups = [group for unit_groups in units.values() for group in unit_groups]
    assert len(groups) == len(units)
    for group in groups:
        # OffloadPolicy(), FSDP's default, offloads nothing; only its CPUOffloadPolicy subclass does.
        assert isinstance(group.offload_policy, CPUOffloadPolicy), type(group.offload_policy)
        assert group.offload_policy.pin_memory is False  # pinning needs an accelerator; a CPU run has none
        assert group.fsdp_params and all(param.offload_to_cpu for param in group.fsdp_params)
    # Every parameter of the model is a shard one of those groups manages (and so offloads).
    managed = {id(param.sharded_param) for group in groups for param in group.fsdp_params}
    assert {id(p) for p in plan.model.parameters()} <= managed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="where the shards live is only visible with a CUDA device to compute on; no CUDA device here")
def test_on_cuda_the_shards_stay_on_the_host_while_the_layers_compute_on_the_gpu(process_group):
    from gputech_bench.config import BenchConfig, apply_overrides
    from gputech_bench.strategies import RunContext

    ctx = RunContext(apply_overrides(BenchConfig(), ["device=cuda", *OVERRIDES]), torch.device("cuda"), new_head_modules=())
    plan = build_plan(parse_cell("fsdp-offload"), tiny_bert(), ctx)
    for unit_groups in offload_units(plan.model).values():
        assert all(group.offload_policy.pin_memory for group in unit_groups)
    # A layer's weights as its forward sees them: gathered onto the GPU for that forward only.
    query = plan.model.bert.encoder.layer[0].attention.self.query
    seen = []
    query.register_forward_hook(lambda module, args, output: seen.append((module.weight.device.type, output.device.type)))
    scheduler = get_linear_schedule_with_warmup(plan.optimizer, 0, 10)
    loss = optimizer_step(plan, scheduler, batch(0), ctx)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert seen == [("cuda", "cuda")]

    params = plan.placement.optimizer_parameters()
    assert params and all(isinstance(p, DTensor) for p in params)
    # Between steps the shards, and the optimizer state stepped with them, are host tensors, pinned.
    assert all(p.to_local().device.type == "cpu" and p.to_local().is_pinned() for p in params)
    states = [value for state in plan.optimizer.state.values() for value in state.values()
              if isinstance(value, DTensor)]
    assert states and all(value.to_local().device.type == "cpu" for value in states)
    accumulate_gradients(plan, batch(1), ctx.device)
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(isinstance(g, DTensor) and g.to_local().device.type == "cpu" for g in grads)


@pytest.mark.parametrize("others", ["1", "lora", "sparse-head"])
def test_combinations_train_like_their_cells_without_fsdp(others, process_group):
    _, expected = train(others)
    plan, losses = train(f"{others}+fsdp-offload")
    assert losses == pytest.approx(expected, abs=1e-6)
    # Found inside peft's and sparse-head's wrappers: both layers plus the root.
    assert "3 units" in plan.facts["fsdp_sharding"]


def test_the_memory_estimate_is_refused_in_one_line():
    ctx = dataclasses.replace(context(), tracing=True)
    with pytest.raises(StrategyError) as error:
        device_refusal(parse_cell("fsdp-offload"), ctx)
    assert "fsdp-offload cannot be traced (a fake-tensor trace runs no collective" in str(error.value)
    assert "\n" not in str(error.value)
    assert FsdpOffload.trace_refusal("cuda")


# --------------------------------------------------------------------------- two ranks


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank, set up as torch.distributed.run would: it trains on its half of each batch.

    The group's store is the one this test hosts, as torchrun's agent hosts it
    (TORCHELASTIC_USE_AGENT_STORE): every rank joins it as a client through env://."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)  # two ranks share two cores
    try:
        half = BATCH // WORLD_SIZE
        plan, losses = train("fsdp-offload", slice(rank * half, (rank + 1) * half))
        gradients = full_gradients(plan)
        mean_losses = torch.tensor(losses)
        dist.all_reduce(mean_losses)
        report = {
            "world_size": plan.facts["fsdp_world_size"],
            "losses": (mean_losses / WORLD_SIZE).tolist(),
            "local_elements": sum(p.to_local().numel() for p in plan.model.parameters()),
            "total_elements": sum(p.numel() for p in plan.model.parameters()),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            torch.save(gradients, Path(out_dir, "gradients.pt"))
    finally:
        distributed.shutdown()


def run_ranks(out_dir: Path) -> None:
    # The store listens on a port the kernel picks (0) and keeps it until the ranks are done. A
    # port probed free and released for rank 0 to bind again could be taken in between.
    store = dist.TCPStore("127.0.0.1", 0, WORLD_SIZE, is_master=True, wait_for_workers=False)
    ranks = mp.start_processes(rank_main, args=(store.port, str(out_dir)), nprocs=WORLD_SIZE,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ranks.join(timeout=1):  # raises, with the rank's traceback, when one fails
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo ranks did not finish in {SPAWN_DEADLINE_S} s")


@pytest.mark.slow
def test_two_gloo_ranks_each_hold_half_and_train_like_one_process(tmp_path):
    run_ranks(tmp_path)
    baseline, expected = train("baseline")

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    total = reports[0]["total_elements"]
    assert total == sum(p.numel() for p in baseline.model.parameters())
    for report in reports:
        assert report["world_size"] == WORLD_SIZE
        assert report["losses"] == pytest.approx(expected, abs=2e-6)
        # Dim-0 shards: an odd-sized dimension leaves one rank a row more.
        assert abs(report["local_elements"] - total / WORLD_SIZE) <= 0.01 * total
    assert sum(report["local_elements"] for report in reports) == total
    assert_same_gradients(full_gradients(baseline), torch.load(tmp_path / "gradients.pt"))
