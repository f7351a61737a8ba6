"""gw.watch on Transformers: attention probes on the budget's steps, the flight recorder on every step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.probes.attention import AttentionProbe
from gradwatch.tinylm import MarkovCopyLanguage, TinyLM

SPIKE_AT = 50


def _train(tmp_path, steps=60, spike_at=None, watch=True, name="tf", **kw):
    """A toy TinyLM on the Markov-copy language; at ``spike_at`` the batch's logits are scaled ×1000."""
    torch.manual_seed(0)
    model = TinyLM(32, 32, 2, 2, 32)
    lang = MarkovCopyLanguage(32, 32, markov=20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    w = gw.watch(model, opt, store=tmp_path, name=name, overwrite=True, **kw) if watch else None
    try:
        for step in range(steps):
            x, y = lang.batch(8, g)
            out = model(x)
            if step == spike_at:
                out = out * 1000
            loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss)
    finally:
        if w is not None:
            w.close()
    return model, (None if w is None else w.path)


def test_watching_a_transformer_changes_no_parameter(tmp_path):
    """Promise 1 with the attention probes (every step) and the flight recorder on, across an event."""
    plain, _ = _train(tmp_path, steps=30, spike_at=20, watch=False)
    watched, path = _train(tmp_path, steps=30, spike_at=20, attention=1, budget=None)
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), n
    with gw.open_run(path) as run:
        assert run.meta["flight"]["events"] == [20]
        assert sorted(set(run.records("attn_logit_max")["step"].tolist())) == list(range(30))


def test_attention_records_are_the_probes_own(tmp_path):
    """What the watch stores per head is what a free-standing AttentionProbe measures on the same forward pass."""
    torch.manual_seed(0)
    model = TinyLM(32, 32, 2, 2, 32)
    x = torch.randint(0, 31, (4, 32))
    with AttentionProbe(model) as probe:
        model(x)
        ref = {k: float(v) for k, v in probe.collect().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, store=tmp_path, name="probe", attention=1, flight=False) as w:
        model(x).sum().backward()
        opt.step()
    with gw.open_run(w.path) as run:
        for (layer, quantity, head), v in ref.items():
            if head is None:
                got = run.series(quantity).values[run.series(quantity).names.index(layer), 0]
            else:
                t = run.temporal(layer, quantity)
                got = t.values[t.names.index(str(head)), 0]
            assert got == pytest.approx(v, rel=1e-9), (layer, quantity, head)


def test_the_attention_family_is_budgeted_and_can_be_turned_off(tmp_path):
    _, path = _train(tmp_path, steps=40)
    with gw.open_run(path) as run:
        assert run.meta["schedules"]["attention"]["by"] == "the budget"
        sampled = sorted(set(run.records("attn_entropy")["step"].tolist()))
        assert sampled and sampled[0] == 0 and len(sampled) < 40  # the floor at least: every 16th step
    _, path = _train(tmp_path, steps=5, attention=False, name="off")
    with gw.open_run(path) as run:
        assert "attn_entropy" not in run.quantities and run.meta["schedules"]["attention"]["by"] == "off"


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_flight_recorder_catches_an_injected_spike_through_the_watch(tmp_path, seed):
    """A batch ×1000 at a known step: the event is at that step, the store holds the weight norms of the 64 steps
    before it (update ratios alone sample far fewer), and every family records in the 20 steps after."""
    torch.manual_seed(seed)
    _, path = _train(tmp_path, steps=SPIKE_AT + 25, spike_at=SPIKE_AT, budget=None)
    with gw.open_run(path) as run:
        assert run.meta["flight"]["events"] == [SPIKE_AT]
        w = run.series("weight_norm")
        assert set(range(0, SPIKE_AT + 1)) <= set(w.steps.tolist())  # capacity 64 > 50: every step before it
        up = set(run.records("update_ratio")["step"].tolist())
        assert set(range(SPIKE_AT + 1, SPIKE_AT + 21)) <= up and SPIKE_AT + 22 not in up
        att = set(run.records("attn_entropy")["step"].tolist())
        assert set(range(SPIKE_AT + 1, SPIKE_AT + 21)) <= att
        counts = np.unique(run.records("weight_norm", kind="layer")["step"], return_counts=True)[1]
        assert (counts == len(run.layers)).all()  # no step written twice


def test_buffered_weight_norms_match_a_naive_loop(tmp_path):
    """The dump's weight_norm of a layer is √Σ‖w‖² over its parameters before that step's update."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    naive = {}
    with gw.watch(model, opt, store=tmp_path, name="naive", update_every=1000, activations=False,
                  flight=True) as w:
        for step in range(30):
            x = torch.randn(16, 4) * (1000 if step == 25 else 1)
            naive[step] = [float(torch.sqrt(sum(p.detach().double().norm() ** 2 for p in m.parameters())))
                           for m in (model[0], model[2])]
            loss = F.mse_loss(model(x), torch.ones(16, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with gw.open_run(w.path) as run:
        assert run.meta["flight"]["events"] == [25]
        s = run.series("weight_norm")
        for j, step in enumerate(s.steps.tolist()):
            if 0 < step <= 25:  # step 0 is an update step (its weight_norm is the update family's); then it diverges
                assert s.values[:, j].tolist() == pytest.approx(naive[step], rel=1e-6)  # float32 norms


def test_a_failing_attention_probe_never_stops_training(tmp_path, monkeypatch):
    from gradwatch.probes import attention

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(attention, "head_stats", boom)
    plain, _ = _train(tmp_path, steps=10, watch=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, path = _train(tmp_path, steps=10, attention=1)
    assert any("attention probe stopped" in str(c.message) for c in caught)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    with gw.open_run(path) as run:
        assert len(run.series("grad_norm").steps) == 10


def test_bad_attention_and_flight_arguments(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"`watch\(flight=…\)` expects 'auto', True/False"):
        gw.watch(model, flight=3)
    with gw.watch(model, store=tmp_path, name="mlp") as w:  # "auto": no attention, no recorder
        pass
    assert "flight" not in w.open().meta
    with pytest.raises(TypeError, match=r"`watch\(attention=…\)` expects a positive int"):
        gw.watch(model, attention="often")


def test_the_report_shows_the_heads_and_the_spike_timeline(tmp_path):
    """HTML: per-head logit and entropy heat maps and a timeline around the flight recorder's event; the terminal
    names each module's largest logit (the stored maximum) and the event."""
    from gradwatch.report.html import render_html
    from gradwatch.report.terminal import render_text

    _, path = _train(tmp_path, steps=SPIKE_AT + 5, spike_at=SPIKE_AT, attention=10)
    with gw.open_run(path) as run:
        diagnosis = gw.diagnose(run)
        page = render_html(run, diagnosis)
        for fig in ("attention-logits", "attention-entropy", "spike-timeline"):
            assert f'id="{fig}"' in page
        text = render_text(run, diagnosis)
        top = run.temporal("blocks.0.attn", "attn_logit_max").values
        assert f"attention blocks.0.attn: max logit {np.nanmax(top):.3g}" in text
        assert f"steps {SPIKE_AT}" in text
    _, path = _train(tmp_path, steps=5, attention=False, flight=False, name="plain")
    with gw.open_run(path) as run:
        page = render_html(run, gw.diagnose(run))
        assert 'id="attention-logits"' not in page and 'id="spike-timeline"' not in page
