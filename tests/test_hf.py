"""The Hugging Face callback, in a real ``Trainer.train`` of a tiny GPT-2 built from a config (offline)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import at_step, naive_layer_grad_norms  # noqa: E402
from gradwatch.integrations.hf import GradwatchCallback  # noqa: E402

STEPS = 4


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _dataset():
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


class PostClip(transformers.TrainerCallback):
    """A naive loop over param.grad where the Trainer hands over the gradients: after it clipped them."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms.append(naive_layer_grad_norms(model))


def _train(tmp_path, callbacks, max_grad_norm=0.01, steps=STEPS, trainer_class=transformers.Trainer, **more):
    settings = dict(use_cpu=True, gradient_accumulation_steps=2, max_grad_norm=max_grad_norm, report_to=[],
                    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0) | more
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps,
                                          per_device_train_batch_size=4, **settings)
    model = _gpt2(settings["seed"])
    trainer = trainer_class(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks)
    trainer.train()
    return model, trainer


def test_records_are_the_gradients_before_the_trainer_clips_them(tmp_path, store):
    cb, post = GradwatchCallback(store=store, name="gpt2"), PostClip()
    _, trainer = _train(tmp_path, [cb, post])
    hf_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]  # the Trainer's pre-clip norm
    assert len(hf_norms) == STEPS and min(hf_norms) > 0.01 * 10  # clipping really cut them
    run = cb.watch.open()
    assert run.meta["steps"] == STEPS and run.meta["status"] == "closed"
    params = run.records("grad_norm", "param")
    for step in range(STEPS):
        # The total over distinct parameters (lm_head.weight is wte.weight, tied) is the Trainer's own number.
        sel = (params["step"] == step) & (params["layer"] != "lm_head.weight")
        total = math.sqrt(float((params["value"][sel] ** 2).sum()))
        assert total == pytest.approx(hf_norms[step], rel=1e-5)
        # Per layer: clipping scales every gradient by one factor, so the naive post-clip norms times
        # (pre-clip total / post-clip total) are the pre-clip ones.
        after = post.norms[step]
        after_total = math.sqrt(sum(v * v for k, v in after.items() if k != "lm_head"))
        got = at_step(run, "grad_norm", step)
        assert got.keys() == after.keys()
        for name, value in after.items():
            assert got[name] == pytest.approx(value * hf_norms[step] / after_total, rel=1e-4), (step, name)
    assert len(run.series("loss", "run").steps) == STEPS
    assert "update_ratio" in run.quantities and "out_grad_norm" in run.quantities


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, store):
    plain, _ = _train(tmp_path / "a", [])
    watched, _ = _train(tmp_path / "b", [GradwatchCallback(store=store, name="same", activations=1, update_every=1)])
    for (name, a), b in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(a, b), name



SPIKE_AT, FLIGHT_STEPS, FLIGHT_KEEP, EVERY = 21, 27, 16, 4  # the spike on a step without gradient norms


class SpikeTrainer(transformers.Trainer):
    """A Trainer whose loss is scaled ×1000 on one known optimizer step (both of its micro-batches)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * 1000.0 if self.state.global_step == SPIKE_AT else loss


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_flight_recorder_catches_an_injected_spike_through_the_callback(tmp_path, store, seed):
    """The recorder on (GPT-2 has attention: flight="auto"), gradient norms every 4th step: the event is at the
    injected step, the 16 steps up to it are in the store with the gradient norms from before the Trainer clipped
    them (their total over distinct parameters is the Trainer's own pre-clip grad_norm), and update ratios follow on
    every step of the detail window."""
    cb = GradwatchCallback(store=store, name="hf-flight", budget=None, every=EVERY, flight=FLIGHT_KEEP)
    _, trainer = _train(tmp_path, [cb], max_grad_norm=1.0, steps=FLIGHT_STEPS, trainer_class=SpikeTrainer, seed=seed)
    hf_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(hf_norms) == FLIGHT_STEPS and hf_norms[SPIKE_AT] > 100 * max(hf_norms[:SPIKE_AT])
    kept = set(range(SPIKE_AT - FLIGHT_KEEP + 1, SPIKE_AT + 1))
    with cb.watch.open() as run:
        assert run.meta["flight"]["events"] == [SPIKE_AT]
        grads = run.records("grad_norm", "layer")
        detail = set(range(SPIKE_AT + 1, FLIGHT_STEPS))  # every family records on every step of the window
        assert set(grads["step"].tolist()) == set(range(0, FLIGHT_STEPS, EVERY)) | kept | detail
        assert kept <= set(run.series("weight_norm").steps.tolist())
        assert detail <= set(run.series("update_ratio").steps.tolist())
    for step in sorted(kept | detail):
        sel = (grads["step"] == step) & (grads["layer"] != "lm_head")  # lm_head.weight is wte.weight (tied)
        assert math.sqrt(float((grads["value"][sel] ** 2).sum())) == pytest.approx(hf_norms[step], rel=1e-5), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate uses a float16 loss scaler on CUDA only")
def test_float16_norms_are_divided_by_the_loss_scale(tmp_path, store):
    """With fp16=True accelerate scales the loss with a GradScaler; the records are of the unscaled gradients."""
    cb = GradwatchCallback(store=store, name="fp16")
    _, trainer = _train(tmp_path, [cb], fp16=True, use_cpu=False)
    assert trainer.accelerator.scaler is not None
    hf_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    params = cb.watch.open().records("grad_norm", "param")
    for step in range(STEPS):
        sel = (params["step"] == step) & (params["layer"] != "lm_head.weight")
        assert math.sqrt(float((params["value"][sel] ** 2).sum())) == pytest.approx(hf_norms[step], rel=1e-3)


class _RaiseAt(transformers.TrainerCallback):
    """Makes Trainer.train raise at one step, as a bad batch or an OOM would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("boom")


def test_hf_callback_closes_its_watch_when_training_raises(tmp_path, store):
    cb, boom = GradwatchCallback(store=store, name="raises"), _RaiseAt(2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                                          use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    model = _gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb, boom])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    first = cb.watch
    # Transformers has no exception event: the next train() finds the watch open (no on_train_end came) and
    # closes it as interrupted, instead of failing with "already watched".
    trainer.remove_callback(boom)
    cb.options = dataclasses.replace(cb.options, name="retried")
    trainer.train()
    assert first.closed and cb.watch is not first and cb.watch.closed
    with first.open() as run:
        assert run.meta["status"].startswith("interrupted") and run.meta["steps"] == 2
    with cb.watch.open() as run:
        assert run.meta["status"] == "closed" and run.meta["steps"] == STEPS
    assert all(not m._forward_hooks for m in model.modules())
