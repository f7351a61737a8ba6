"""Spike detection with attribution: robust statistics, events, first movers and mechanisms against hand-made series."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import numpy as np
import pytest

from gradwatch.diagnosis.instability import (
    InstabilityThresholds,
    ProbeSeries,
    events,
    first_movers,
    mechanisms,
    robust_z,
)

TH = InstabilityThresholds()


def _loss(n: int = 300, seed: int = 0) -> np.ndarray:
    """A learning curve 3 → 1.5 with 3 % multiplicative noise."""
    rng = np.random.default_rng(seed)
    return (1.5 + 1.5 * np.exp(-np.arange(n) / 60)) * np.exp(0.03 * rng.standard_normal(n))


def test_robust_z_against_a_naive_median_and_mad():
    x = np.random.default_rng(0).standard_normal(80) ** 3
    z, med = robust_z(x, window=20)
    for j in (5, 19, 20, 57, 79):
        past = list(x[max(0, j - 20): j])
        m = statistics.median(past)
        mad = statistics.median([abs(p - m) for p in past])
        assert med[j] == pytest.approx(m) and z[j] == pytest.approx((x[j] - m) / (1.4826 * mad))
    assert np.isnan(z[:5]).all()  # fewer than 5 values before: no judgement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_clean_learning_curve_has_no_event(seed):
    steps = np.arange(300)
    assert events(steps, _loss(seed=seed), None, TH) == []


def test_a_spike_a_divergence_and_a_nan_are_found_at_their_steps():
    steps = np.arange(300)
    loss = _loss()
    loss[120] *= 3
    (spike,) = events(steps, loss, None, TH)
    assert (spike.kind, spike.step, spike.last) == ("spike", 120, 120)
    assert spike.numbers["loss_ratio"] == pytest.approx(loss[120] / np.median(loss[70:120]))  # the 50 steps before
    grad = np.exp(0.05 * np.random.default_rng(1).standard_normal(300))
    grad[200] *= 50  # the gradient alone spikes: an event as well
    kinds = [(e.kind, e.step) for e in events(steps, loss, grad, TH)]
    assert kinds == [("spike", 120), ("spike", 200)]
    diverging = _loss()
    diverging[200:] = np.linspace(diverging[199], 4.0, 100)  # climbs to 4 from step 200
    (div,) = events(steps, diverging, None, TH)
    best = np.median(diverging[190:200])  # about its best level
    crossing = int(np.argmax((np.arange(300) >= 200) & (diverging >= 1.5 * best)))
    assert div.kind == "divergence" and abs(div.step - crossing) <= 6 and div.last == 299
    broken = _loss()
    broken[90] = math.nan
    broken[150] *= 5  # after the NaN: a casualty, not judged
    assert [(e.kind, e.step) for e in events(steps, broken, None, TH)] == [("nonfinite", 90)]


def test_first_movers_are_the_layers_whose_update_norm_rose_earliest():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 120)
    norms = np.exp(0.05 * rng.standard_normal((4, 120)))
    norms[1, 95:] *= 10  # "b" from step 95
    norms[2, 98:] *= 30  # "c" from step 98, higher
    moved = first_movers(["a", "b", "c", "d"], steps, norms, t0=100, th=TH)
    assert [(n, s) for n, s, _ in moved] == [("b", 95), ("c", 98)]
    assert moved[1][2] > moved[0][2] > TH.layer_z_above


def _probes(grow: bool, logz_to: float = 0.0, collapse: bool = True) -> ProbeSeries:
    """Two attention modules (4 heads) sampled every 10 steps over 0…200 and an LM head's log Z."""
    collected = {}
    for step in range(0, 201, 10):
        t = step / 200
        stats = {}
        for h in range(4):
            stats[("blocks.0.attn", "attn_logit_max", h)] = 8.0 + h
            stats[("blocks.0.attn", "attn_entropy", h)] = 1.5
            top = 5.0 * (40.0 ** t) if grow and h == 2 else 6.0  # head 2: 5 → 200
            stats[("blocks.1.attn", "attn_logit_max", h)] = top
            stats[("blocks.1.attn", "attn_entropy", h)] = 0.02 if collapse and grow and h in (0, 2) and t > 0.8 else 1.2
        stats[("lm_head", "logz_mean", None)] = 4.0 + (logz_to - 4.0) * t
        collected[step] = stats
    return ProbeSeries.from_collected(collected)


def test_attention_logit_growth_is_named_with_its_module_and_heads():
    (m,) = mechanisms(_probes(grow=True), t0=200, th=TH)
    assert m.key == "attention_logit_growth" and m.remedy_keys[0] == "qk_layernorm"
    assert "blocks.1.attn" in m.words and "blocks.0.attn" not in m.words
    # over the lookback span (0, 200]: from the max over heads at step 10, max(6, 5·40^0.05), to 200
    assert m.numbers["attn_logit_growth"] == pytest.approx(200.0 / max(6.0, 5.0 * 40 ** 0.05))
    assert m.numbers["attn_logit_peak"] == pytest.approx(200.0)
    assert "heads 0, 2 of blocks.1.attn fell below 0.2 nats" in m.words
    assert mechanisms(_probes(grow=False), t0=200, th=TH) == []  # logits in range: no mechanism
    # large logits with every head still spread (a healthy model can carry max logits near 10²): no mechanism
    assert mechanisms(_probes(grow=True, collapse=False), t0=200, th=TH) == []
    # only the span before the event counts: at step 60 the logit had not grown yet
    assert mechanisms(_probes(grow=True), t0=60, th=TH) == []


def test_output_logit_divergence_names_the_z_loss():
    (m,) = mechanisms(_probes(grow=False, logz_to=-35.0), t0=200, th=TH)
    assert m.key == "output_logit_divergence" and m.remedy_keys[0] == "z_loss"
    assert m.numbers["logz"] == pytest.approx(-35.0)


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match=r"`InstabilityThresholds\(window=…\)` expects a positive int"):
        InstabilityThresholds(window=0)
    with pytest.raises(ValueError, match=r"`InstabilityThresholds\(diverge_above=…\)` expects a ratio above 1"):
        InstabilityThresholds(diverge_above=0.5)
    with pytest.raises(ValueError, match=r"`InstabilityThresholds\(diverge_from_start_above=…\)` expects a ratio above 1"):
        InstabilityThresholds(diverge_from_start_above=1.0)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_high_lr_failure_is_attention_logit_growth_and_the_qk_norm_twin_trains(tmp_path, seed):
    """The issue's "done means", on a small proxy (Wortsman et al. 2023), through the watch and gw.diagnose: at lr 0.1
    the plain model's attention goes one-hot and the finding names attention-logit growth (remedy: qk-layernorm);
    its qk-layernorm twin raises no such finding and ends at a lower loss."""
    import gradwatch as gw
    from gradwatch.tinylm import train_proxy

    small = dict(vocab=32, width=32, depth=2, heads=2, seq_len=32, batch=8, steps=100, warmup=10, probe_every=5,
                 store=tmp_path)
    found, final = {}, {}
    for qk in (False, True):
        r = train_proxy(0.1, seed, qk_norm=qk, **small)
        with gw.open_run(r.path) as run:
            assert "attn_logit_max" in run.quantities  # recorded by the watch, not handed over
            found[qk] = gw.diagnose(run).findings
        final[qk] = r.final_loss
    named = [f for f in found[False] if "attention_logit_growth" in f.numbers and f.severity != "info"]
    assert named and named[0].remedy_keys[0] == "qk_layernorm", [str(f) for f in found[False]]
    assert not any("attention_logit_growth" in f.numbers for f in found[True]), [str(f) for f in found[True]]
    assert final[True] < final[False] - 0.2


def test_a_model_with_qk_norm_is_not_told_to_add_it():
    from gradwatch.diagnosis.instability import qk_normalised

    assert qk_normalised({"TinyLM", "HeadNorm"}, [])
    assert qk_normalised(set(), ["model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.q_proj"])
    assert not qk_normalised({"GPT2Attention", "LayerNorm"}, ["transformer.h.0.attn.c_attn", "transformer.h.0.ln_1"])


def test_probe_records_read_back_through_the_store_and_a_run_view(tmp_path):
    """What the watch will write (AttentionProbe.records into a StoreWriter) is what ProbeSeries.from_run reads,
    also through diagnose()'s RunView, which keeps only the steps before its limit."""
    import torch
    from torch import nn

    from gradwatch.diagnosis.view import RunView
    from gradwatch.probes.attention import AttentionProbe
    from gradwatch.store import StoreWriter, open_run

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lm_head = nn.Linear(8, 5)

        def forward(self, x):
            return self.lm_head(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    model = LM()
    probe = AttentionProbe(model).attach()
    writer = StoreWriter(tmp_path / "gradwatch.sqlite")
    collected = {}
    for step in range(4):
        model(torch.randn(3, 6, 8) * (1 + step))
        stats = probe.collect()
        collected[step] = {k: float(v) for k, v in stats.items()}
        writer.records(step, *probe.records(stats, writer))
    writer.close({"status": "finished"})
    with open_run(tmp_path) as run:
        stored = ProbeSeries.from_run(run)
        direct = ProbeSeries.from_collected(collected)
        assert stored is not None and stored.steps.tolist() == [0, 1, 2, 3]
        assert set(stored.values) == set(direct.values) == {("attn", q) for q in ("attn_logit_max", "attn_logit_rms",
                                                                                  "attn_entropy", "attn_empty_frac")} | {("lm_head", "logz_mean"), ("lm_head", "logz_max")}
        for key, values in direct.values.items():
            np.testing.assert_allclose(stored.values[key], values, rtol=1e-6)
        early = ProbeSeries.from_run(RunView(run, 2))  # type: ignore[arg-type]
        assert early is not None and early.steps.tolist() == [0, 1]


def test_a_run_non_finite_from_step_0_has_no_instability_finding_and_diagnoses(tmp_path):
    """Regression: diagnose()'s view of a run NaN from its first step holds no loss; the rules crashed on it."""
    import torch

    import gradwatch as gw

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=tmp_path, name="nan") as w:
        for _ in range(3):
            loss = model(torch.full((4, 2), float("nan"))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert [f.kind for f in gw.diagnose(w.path).problems] == ["nonfinite"]


def test_a_loss_spike_needs_to_stand_above_the_runs_earlier_swings():
    """Closed-form curves: a smooth loss with one jump ×2.5 is a spike; a loss that swings ×15 every 40 steps has
    one at its first swing and none at a later swing of ×16 (no larger than before: so_quadratic_fixed on AMD
    EPYC), but one at ×300."""
    from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds
    from gradwatch.diagnosis.spikes import events

    th = InstabilityThresholds()
    steps = np.arange(600)
    rng = np.random.default_rng(0)
    smooth = 3.0 * np.exp(-steps / 400) * np.exp(rng.normal(0, 0.01, len(steps)))
    smooth[450] *= 2.5
    assert [e.step for e in events(steps, smooth, None, th) if e.kind == "spike"] == [450]
    swinging = 50.0 * np.exp(rng.normal(0, 0.1, len(steps)))
    swinging[40::40] *= 15.0
    swinging[500] *= 16.0
    assert [e.step for e in events(steps, swinging, None, th) if e.kind == "spike"] == [40]
    swinging[500] *= 300.0 / 16.0
    assert [e.step for e in events(steps, swinging, None, th) if e.kind == "spike"] == [40, 500]


def test_a_recovered_spike_folded_into_a_worse_finding_loses_its_info_only_clause():
    """A spike the run got over is info ("the run recovered … (info only)"); folded into an attention finding that
    is a warning at the same steps, that clause would tell the reader the opposite of the finding's severity."""
    from gradwatch.diagnosis.findings import Finding
    from gradwatch.diagnosis.over_steps import RECOVERED
    from gradwatch.diagnosis.rules import merge_spikes

    spike = Finding(kind="exploding", severity="info", layers=(), steps=(42, 42), summary="a spike",
                    evidence=f"1 spike above 10× the median (step 42); {RECOVERED}: the total norm is back at 0.31 "
                             "and the loss ends at 1.9, no higher than before the first spike (2.1): no lasting "
                             "damage (info only).", cause="", remedies=(),
                    numbers={"peak": 9.0, "recovered": 1.0})
    attention = Finding(kind="exploding", severity="warning", layers=("attn",), steps=(20, 290),
                        summary="the attention went one-hot", evidence="attention logits grew in attn.", cause="",
                        remedies=("qk-layernorm",), numbers={"attention_logit_growth": 1.0})
    (merged,) = merge_spikes([spike], [attention])
    assert merged.severity == "warning" and merged.steps == (20, 290)
    assert merged.evidence == "attention logits grew in attn; 1 spike above 10× the median (step 42)."
    assert "recovered" not in merged.numbers and merged.numbers["peak"] == 9.0
    calm = replace(attention, severity="info")  # an info finding keeps the words that say why it is info
    (kept,) = merge_spikes([spike], [calm])
    assert kept.severity == "info" and kept.evidence.endswith("no lasting damage (info only).")


def test_a_spike_in_a_net_without_attention_is_not_told_of_attention_statistics(tmp_path):
    """Measured (an MLP with BatchNorm at batch size 2): a loss spike's cause read "no attention or log-Z statistics
    were recorded: the mechanism cannot be told apart" — words for a Transformer. A net with no attention gets the
    plain cause; one with attention but no probe records still hears what is missing."""
    import torch

    import gradwatch as gw

    class Net(torch.nn.Module):
        def __init__(self, attention: bool) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
            if attention:
                self.attn = torch.nn.MultiheadAttention(4, 1)  # present (its class is recorded), never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    for attention, words in ((False, "unstable steps: a sharp region"), (True, "no attention or log-Z statistics")):
        torch.manual_seed(0)
        model = Net(attention)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        with gw.watch(model, opt, attention=False, store=tmp_path, name=f"spike-{attention}") as w:
            for step in range(120):
                x = torch.randn(16, 4, generator=g) * (30.0 if step == 80 else 1.0)  # one bad batch
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss)
        spikes = [f for f in gw.diagnose(w.path).findings if f.kind == "exploding" and "onset" in f.numbers]
        assert spikes and spikes[0].cause.startswith(words), [str(f) for f in gw.diagnose(w.path).findings]
