"""The training objective (data.objective): the seed's own, proven position by position,
and the standard masked-LM beside it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import context, tiny_bert
from transformers.modeling_outputs import MaskedLMOutput

from gputech_bench.config import OBJECTIVES, BenchConfig, apply_overrides, load_preset
from gputech_bench.data import IGNORE_INDEX, MaskingSpec, TokenizedSplit, apply_objective, mask_tokens
from gputech_bench.data.prepare import EvalSet
from gputech_bench.data.seeding import generator
from gputech_bench.errors import ConfigError, StrategyError
from gputech_bench.results import CellResult
from gputech_bench.run.matrix import expand
from gputech_bench.strategies import build_plan, parse_cell
from gputech_bench.strategies.accumulation import split_into_micro_batches
from gputech_bench.training.batches import epoch_batches
from gputech_bench.strategies.defaults import logits_predictor
from gputech_bench.training.evaluate import evaluate
from gputech_bench.training.loop import accumulate_gradients

VOCAB = 1_000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPEC = MaskingSpec(mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(PAD, UNK, CLS, SEP, MASK))


def sentences(rows: int = 400, length: int = 64, seed: int = 123) -> TokenizedSplit:
    """Random ordinary tokens framed like real sentences: [CLS] ... [UNK] ... [SEP] [PAD]..."""
    ids = torch.randint(5, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = CLS
    ids[:, 3] = UNK
    lengths = torch.randint(length // 2, length - 1, (rows,), generator=torch.Generator().manual_seed(seed + 1))
    attention = torch.zeros_like(ids)
    for row, used in enumerate(lengths.tolist()):
        ids[row, used] = SEP
        ids[row, used + 1:] = PAD
        attention[row, : used + 1] = 1
    return TokenizedSplit(ids, attention)


# --------------------------------------------------------------------------- the seed's masks


def test_seed_objective_labels_every_position_padding_included():
    split = sentences()
    out = apply_objective("seed", split.input_ids, SPEC, torch.Generator().manual_seed(0))
    assert torch.equal(out.labels, split.input_ids), "labels are a copy of the whole input ids"
    assert not (out.labels == IGNORE_INDEX).any()
    padding = split.attention_mask == 0
    assert padding.sum() > 1000 and (out.labels[padding] == PAD).all(), "padding is labelled with the pad id"


def test_seed_objective_replaces_only_with_mask_and_never_a_special_token():
    split = sentences()
    ids = split.input_ids
    out = apply_objective("seed", ids, SPEC, torch.Generator().manual_seed(0))
    changed = out.input_ids != ids
    assert torch.equal(changed, out.masked), "exactly the chosen positions change"
    assert (out.input_ids[out.masked] == MASK).all(), "no random token, no kept token: [MASK] only"
    special = torch.isin(ids, torch.tensor([PAD, UNK, CLS, SEP]))
    assert not (out.masked & special).any(), "[CLS], [SEP], [UNK] and [PAD] are never chosen"
    rate = out.masked.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01, rate


def test_mlm_objective_is_the_80_10_10_masking_unchanged():
    ids = sentences(rows=64).input_ids
    out = apply_objective("mlm", ids, SPEC, torch.Generator().manual_seed(5))
    masked, labels = mask_tokens(ids, SPEC, torch.Generator().manual_seed(5))
    assert torch.equal(out.input_ids, masked) and torch.equal(out.labels, labels)
    assert torch.equal(out.masked, labels != IGNORE_INDEX)
    # Some chosen positions keep their token or get a random one: not [MASK] only.
    assert (out.input_ids[out.masked] != MASK).any()


def masked_epoch(split: TokenizedSplit, objective: str, epoch: int) -> torch.Tensor:
    """The epoch's masked input ids, back in the split's row order (the batches are shuffled)."""
    batches = list(epoch_batches(split, SPEC, 16, seed=222, epoch=epoch, objective=objective))
    shuffled = torch.cat([batch["input_ids"] for batch in batches])
    order = torch.randperm(len(split), generator=generator(222, "train-order", epoch))
    unshuffled = torch.empty_like(shuffled)
    unshuffled[order] = shuffled
    return unshuffled


def test_seed_masks_are_identical_across_epochs_and_the_order_still_shuffles():
    split = sentences(rows=48)
    epochs = [masked_epoch(split, "seed", epoch) for epoch in range(3)]
    assert (epochs[0] == MASK).sum() > 100
    assert torch.equal(epochs[0], epochs[1]) and torch.equal(epochs[0], epochs[2]), "same masked sentences every epoch"
    first_rows = [next(epoch_batches(split, SPEC, 16, 222, epoch, "seed"))["labels"][0] for epoch in (0, 1)]
    assert not torch.equal(*first_rows), "the batches are still shuffled per epoch"


def test_mlm_masks_are_drawn_afresh_each_epoch():
    split = sentences(rows=48)
    first, second = masked_epoch(split, "mlm", 0), masked_epoch(split, "mlm", 1)
    assert not torch.equal(first == MASK, second == MASK)


# --------------------------------------------------------------------------- the seed's loss


def seed_batch(vocab: int = 300, rows: int = 8, length: int = 24) -> dict[str, torch.Tensor]:
    split = sentences(rows=rows, length=length)
    ids = split.input_ids.clamp(max=vocab - 1)
    out = apply_objective("seed", ids, MaskingSpec(MASK, vocab, (PAD, UNK, CLS, SEP, MASK)), torch.Generator().manual_seed(1))
    return {"input_ids": out.input_ids, "attention_mask": split.attention_mask, "labels": out.labels}


def test_seed_loss_is_the_cross_entropy_over_every_position_padding_included():
    model = tiny_bert(vocab=300).eval()
    batch = seed_batch()
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits.reshape(-1, 300)
    labels = batch["labels"].reshape(-1)
    by_hand = -F.log_softmax(logits.double(), dim=-1).gather(1, labels[:, None]).mean()
    torch.testing.assert_close(output.loss.double(), by_hand, rtol=1e-5, atol=1e-6)
    real = batch["attention_mask"].reshape(-1).bool()
    without_padding = F.cross_entropy(logits[real], labels[real])
    assert abs(float(output.loss) - float(without_padding)) > 1e-3, "padding is scored, so leaving it out changes the loss"


def test_under_the_seed_objective_both_accumulation_rules_give_the_full_batchs_gradients():
    """Every micro-batch holds micro x length labelled positions, so the seed's /k rule and the
    token-weighted rule weigh them alike, and both equal the full batch of 32."""
    batch = seed_batch(rows=32)
    seed_rule = split_into_micro_batches(batch, 8, 4, "seed")
    weighted = split_into_micro_batches(batch, 8, 4, "token-weighted")
    assert [m.loss_weight for m in seed_rule] == [m.loss_weight for m in weighted] == [0.25] * 4

    def gradients(cell: str, *overrides: str) -> dict[str, torch.Tensor]:
        ctx = context("train.batch_size=32", "strategy.micro_batch_size=8", *overrides)
        plan = build_plan(parse_cell(cell), tiny_bert(), ctx)
        accumulate_gradients(plan, batch, ctx.device)
        return {name: p.grad.clone() for name, p in plan.model.named_parameters() if p.grad is not None}

    full = gradients("baseline")
    for rule in ("seed", "token-weighted"):
        accumulated = gradients("2", f"strategy.accumulation_loss={rule}")
        scale = max(float(g.abs().max()) for g in full.values())
        for name in full:
            torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


# --------------------------------------------------------------------------- the accuracies


class Copier(torch.nn.Module):
    """Predicts the original token everywhere except at the masked positions (where it says 5):
    the seed's token accuracy is then high and the masked accuracy zero, by construction."""

    def __init__(self, original: torch.Tensor) -> None:
        super().__init__()
        self.original = original

    def forward(self, input_ids, attention_mask, labels):
        predicted = torch.where(input_ids == MASK, torch.full_like(input_ids, 5), self.original[: input_ids.shape[0]])
        logits = F.one_hot(predicted, VOCAB).float() * 10
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return MaskedLMOutput(loss=loss, logits=logits)


@pytest.mark.parametrize("objective", ["seed", "mlm"])
def test_token_accuracy_scores_real_tokens_and_masked_accuracy_the_masked_ones(objective):
    split = sentences(rows=16)
    out = apply_objective(objective, split.input_ids, SPEC, torch.Generator().manual_seed(2))
    eval_set = EvalSet(out.input_ids, out.labels, split.input_ids, split.attention_mask, out.masked)
    scores = evaluate(logits_predictor(Copier(split.input_ids), causal=False), eval_set, torch.device("cpu"), batch_size=16)
    real = split.attention_mask.bool()
    # [MASK] shows at the chosen positions only under seed; mlm keeps or randomises some of them.
    shows_mask = (out.input_ids == MASK) & real
    assert scores.masked_tokens == int(out.masked.sum())
    assert scores.scored_tokens == int(real.sum())
    assert scores.token_accuracy == pytest.approx(1 - shows_mask.sum().item() / real.sum().item())
    expected_masked = 1 - (shows_mask & out.masked).sum().item() / out.masked.sum().item()
    assert scores.masked_accuracy == pytest.approx(expected_masked)
    assert scores.labelled_tokens == (split.input_ids.numel() if objective == "seed" else int(out.masked.sum()))
    if objective == "seed":
        assert scores.masked_accuracy == 0 and scores.token_accuracy > 0.8


# --------------------------------------------------------------------------- settings and refusals


def test_the_objective_setting_defaults_to_the_seeds_and_the_presets_follow():
    assert BenchConfig().data.objective == "seed"
    assert {load_preset(name).data.objective for name in ("seed", "seed-512", "cpu")} == {"seed"}
    assert tuple(OBJECTIVES) == ("seed", "mlm", "clm")  # clm: the causal LM's one objective


def test_an_unknown_objective_is_one_line_listing_the_valid_values():
    with pytest.raises(ConfigError) as excinfo:
        apply_overrides(BenchConfig(), ["data.objective=foo"])
    message = str(excinfo.value)
    assert "\n" not in message and "data.objective" in message and "seed, mlm" in message and "'foo'" in message


def test_sparse_head_is_refused_under_the_seed_objective_and_runs_under_mlm():
    config = apply_overrides(load_preset("cpu"), ["device=cpu"])
    with pytest.raises(StrategyError) as excinfo:
        expand("1,sparse-head", False, config, cuda=False)
    assert "--set data.objective=mlm" in str(excinfo.value) and "\n" not in str(excinfo.value)
    mlm = apply_overrides(config, ["data.objective=mlm"])
    assert expand("sparse-head,amp+sparse-head", False, mlm, cuda=False) == ["baseline", "sparse-head", "amp+sparse-head"]


def test_the_cli_refuses_sparse_head_under_the_seed_objective_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from gputech_bench.cli import app

    result = CliRunner().invoke(app, ["run", "--strategies", "sparse-head", "--preset", "cpu", "--device", "cpu",
                                      "--results", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.objective=mlm" in lines[0], result.output


def test_an_unknown_objective_exits_2_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from gputech_bench.cli import app

    result = CliRunner().invoke(app, ["run", "--matrix", "--preset", "cpu", "--set", "data.objective=foo",
                                      "--results", str(tmp_path)])
    assert result.exit_code == 2
    assert "data.objective must be one of seed, mlm, clm; got 'foo'" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- what the tables say


def minimal_result(cell: str, objective: str | None) -> dict:
    config = {"data": {"objective": objective}} if objective else {"data": {}}
    metrics = {"tracked_peak_mib": {"value": 10.0}, "epoch_seconds": {"value": 1.0},
               "eval_masked_accuracy": {"value": 0.1}, "eval_token_accuracy": {"value": 0.8}}
    return CellResult.from_dict({"schema": "gputech-bench/cell-result/1", "cell": cell, "status": "ok", "reason": None,
                                 "config": config, "metrics": metrics, "memory_breakdown": {}, "notes": [],
                                 "device": {"type": "cpu"}})


def test_every_table_names_the_objective_and_old_results_read_as_mlm():
    from gputech_bench.report.export import to_csv, to_json
    from gputech_bench.report.frame import build_frame
    from gputech_bench.report.table import table_notes

    frame, _ = build_frame([minimal_result("baseline", "seed"), minimal_result("1", "seed")])
    notes = table_notes(frame)
    assert any(note.startswith("objective: seed (the seed's: labels on every position") for note in notes)
    assert json.loads(to_json(frame, _, "baseline"))["rows"][0]["objective"] == "seed"
    assert "objective" in to_csv(frame).splitlines()[0].split(",")

    old, _ = build_frame([minimal_result("baseline", None)])  # written before the setting existed
    assert old["objective"].tolist() == ["mlm"]

    mixed, _ = build_frame([minimal_result("baseline", "seed"), minimal_result("1", "mlm")])
    assert any("objective differs between cells" in note for note in table_notes(mixed))


def test_compare_warns_when_the_objectives_differ(tmp_path):
    from gputech_bench.report.compare import compare_runs
    from gputech_bench.results import LoadedRun, RunFolder

    run_a = LoadedRun(RunFolder(tmp_path / "a"), [minimal_result("baseline", "mlm")], config={"data": {"objective": "mlm"}})
    run_b = LoadedRun(RunFolder(tmp_path / "b"), [minimal_result("baseline", "seed")], config={"data": {"objective": "seed"}})
    warnings = compare_runs(run_a, run_b).warnings
    assert any(w.startswith("training objectives differ: mlm -> seed") for w in warnings), warnings
    same = compare_runs(run_a, run_a).warnings
    assert not any("objectives differ" in w for w in same)
