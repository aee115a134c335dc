"""fit weighs, from a CPU-only torch, every strategy it can reason about: amp and amp-fp16
traced on the stand-in under CUDA autocast's op lists, sparse-head under the mlm objective,
paged-adam8bit's state on the host side; what it cannot weigh is listed with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_RUN

from gputech_bench.config import apply_overrides, load_preset
from gputech_bench.estimator.autocast import cuda_autocast_rules
from gputech_bench.estimator.fit import candidates, not_searched, unsearchable
from gputech_bench.estimator.predict import Setup, predict
from gputech_bench.estimator.render import EstimateReport, markdown
from gputech_bench.estimator.overheads import Overheads
from gputech_bench.estimator.trace import STAND_IN_AUTOCAST, TraceTarget, trace_cell, trace_inputs
from gputech_bench.strategies import parse_cell
from gputech_bench.worker.cell import new_result, run_cell

MIB = 2**20
#: The meta stand-in whatever this torch is: the tests hold on a CUDA build too.
STAND_IN = TraceTarget(torch.device("meta"), "stand-in (test)", None)
# Tensor bytes alone: no context, no reserve, the allocator's replay left out (its segments
# and workspaces would dwarf a tiny model's bytes; tests/test_reserved.py checks the replay).
NO_OVERHEAD = Overheads(0, "test", 0.0, "test", replayed=False)


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    config = apply_overrides(load_preset("cpu"), TINY_RUN + [f"data.cache_dir={cache_dir}", "train.max_steps=2"])
    return config, trace_inputs(config)


@pytest.fixture(scope="module")
def tiny_mlm(tiny):
    config = apply_overrides(tiny[0], ["data.objective=mlm"])
    return config, trace_inputs(config)


# --------------------------------------------------------------------------- CUDA autocast's rules


def test_the_stand_in_applies_cuda_autocasts_lists_on_meta_tensors():
    weight = torch.randn(8, 8, device="meta", requires_grad=True)
    x = torch.randn(4, 8, device="meta")
    # Negative control: no rules, no casts.
    assert F.linear(x, weight).dtype == torch.float32
    with cuda_autocast_rules(torch.bfloat16):
        hidden = F.linear(x, weight)
        again = F.linear(x, weight)
        probabilities = torch.softmax(hidden, -1)
        normed = F.layer_norm(hidden, (8,))
        joined = torch.cat([hidden, x])
    assert hidden.dtype == again.dtype == torch.bfloat16  # lower-precision list
    assert probabilities.dtype == normed.dtype == torch.float32  # CUDA's fp32 list
    assert joined.dtype == torch.float32  # promote list: the widest input
    # The weight is cast once per autocast region (autocast's cache): one half copy, not two.
    assert _casts_of_weight(hidden) == _casts_of_weight(again) and len(_casts_of_weight(hidden)) == 1


def _casts_of_weight(output: torch.Tensor) -> set[int]:
    """The autograd nodes that cast an fp32 leaf to half on the way to ``output``."""
    found, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if type(node).__name__ == "ToCopyBackward0" and any(
            type(nxt).__name__ == "AccumulateGrad" for nxt, _ in node.next_functions
        ):
            found.add(id(node))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def test_cpu_autocast_differs_from_cudas_where_the_label_says():
    """Why CPU autocast is not the stand-in: it keeps softmax at its input's dtype."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on_cpu = torch.softmax(x, -1)
    with cuda_autocast_rules(torch.bfloat16):
        as_on_cuda = torch.softmax(x, -1)
    assert (on_cpu.dtype, as_on_cuda.dtype) == (torch.bfloat16, torch.float32)
    assert "softmax" in STAND_IN_AUTOCAST and "CPU autocast" in STAND_IN_AUTOCAST


# Under checkpointing the activations left are mostly the loss's fp32 logits: a smaller saving.
@pytest.mark.parametrize(("cell", "control", "at_most"), [("amp", "baseline", 0.9), ("amp-fp16", "baseline", 0.9),
                                                          ("1+amp", "1", 0.99)])
def test_amp_is_traced_on_the_stand_in_with_half_the_matmul_activations(tiny, cell, control, at_most):
    config, inputs = tiny
    amp = trace_cell(parse_cell(cell), config, inputs, STAND_IN)
    kept = trace_cell(parse_cell(control), config, inputs, STAND_IN)
    assert amp.method == STAND_IN_AUTOCAST and kept.method is None
    # The weights, gradients and optimizer stay fp32: the same bytes.
    for category in ("parameters", "optimizer_state"):
        assert amp.device.by_category[category] == kept.device.by_category[category]
    # Matmul outputs are saved in half precision; softmax, layer_norm and the loss stay fp32.
    saved, control_saved = amp.device.by_category["activations"], kept.device.by_category["activations"]
    assert 0.5 * control_saved < saved < at_most * control_saved, (saved, control_saved)
    assert amp.device.total_bytes < kept.device.total_bytes


def test_a_stand_in_figure_is_labelled_so(tiny):
    config, _ = tiny
    if torch.cuda.is_available():
        pytest.skip(reason="a CUDA torch traces amp on fake CUDA tensors: no stand-in to label")
    prediction, = predict([Setup("amp")], config)
    assert prediction.error is None and prediction.source == "stand-in"
    text = markdown(EstimateReport("test", None, [prediction], NO_OVERHEAD))
    assert "| amp | stand-in [1] |" in text and "- [1] stand-in autocast:" in text


# --------------------------------------------------------------------------- sparse-head


def test_sparse_head_under_mlm_is_traced_below_the_baseline_and_matches_a_real_run(tiny_mlm):
    # Without dropout: a CPU run's dropout is unfused, where the trace follows a GPU's kernel.
    config = apply_overrides(tiny_mlm[0], ["model.dropout=0.0"])
    inputs = trace_inputs(config)
    sparse = trace_cell(parse_cell("sparse-head"), config, inputs, STAND_IN)
    baseline = trace_cell(parse_cell("baseline"), config, inputs, STAND_IN)
    assert sparse.device.total_bytes < 0.8 * baseline.device.total_bytes
    # The head's rows are the masked positions of the real batches: the trace agrees with a
    # real tracked CPU run of the same cell, as the traced cells do.
    real = run_cell("sparse-head", config, new_result("sparse-head", config))
    assert sparse.device.total_bytes == pytest.approx(real.value("tracked_peak_mib") * MIB, rel=0.05)


# --------------------------------------------------------------------------- paged-adam8bit


def test_paged_adam8bit_counts_its_state_on_the_host_side(tiny):
    config, _ = tiny
    config = apply_overrides(config, ["model.hidden_size=128", "model.intermediate_size=512"])
    adam8bit, paged = predict([Setup("3"), Setup("paged-adam8bit")], config)
    state = adam8bit.device.by_category["optimizer_state"]
    assert state > 0 and adam8bit.host is None
    assert paged.source == "modelled" and "host side" in str(paged.modelled)
    assert paged.device.by_category["optimizer_state"] == 0
    assert paged.host is not None and paged.host.by_category["optimizer_state"] == state  # moved, never free
    assert paged.device.total_bytes == adam8bit.device.total_bytes - state


def test_a_model_around_a_stand_in_trace_says_both(tiny):
    config, _ = tiny
    if torch.cuda.is_available():
        pytest.skip(reason="a CUDA torch traces amp on fake CUDA tensors: no stand-in to label")
    prediction, = predict([Setup("paged-adam8bit+amp")], config)
    assert prediction.source == "modelled" and prediction.error is None
    assert "host side" in str(prediction.modelled) and "the proxy stand-in autocast:" in str(prediction.modelled)


# --------------------------------------------------------------------------- what fit searches


def test_fit_leaves_out_only_what_it_cannot_weigh_each_with_its_reason(tiny, tiny_mlm):
    config, _ = tiny
    assert set(unsearchable("meta")) == {"compile"}
    seed = not_searched(apply_overrides(config, ["data.objective=seed"]), "meta")
    assert set(seed) == {"compile", "sparse-head"}
    assert "Inductor" in seed["compile"]
    assert "every position carries a label" in seed["sparse-head"] and "data.objective=mlm" in seed["sparse-head"]
    assert set(not_searched(tiny_mlm[0], "meta")) == {"compile"}
    assert not_searched(tiny_mlm[0], "meta", exclude={"compile"}) == {}
    # Accumulation is tried at fit's own micro-batch sizes, not the config's: a config whose
    # micro-batch is the whole batch does not leave 2 out.
    assert "2" not in not_searched(apply_overrides(config, ["strategy.micro_batch_size=16"]), "meta")


def test_fit_searches_amp_paged_state_and_sparse_head_from_a_cpu_only_torch(tiny, tiny_mlm):
    cells = {setup.cell for setup in candidates(apply_overrides(tiny[0], ["data.objective=seed"]), device_type="meta")}
    assert {"amp", "amp-fp16", "1+amp", "paged-adam8bit", "1+paged-adam8bit"} <= cells
    assert not any("sparse-head" in cell for cell in cells)  # refused by the seed objective: listed above
    mlm_cells = {setup.cell for setup in candidates(tiny_mlm[0], device_type="meta")}
    assert {"sparse-head", "1+3+amp+sparse-head"} <= mlm_cells
