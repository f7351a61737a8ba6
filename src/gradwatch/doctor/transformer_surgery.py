"""The doctor's procedures for Transformer instabilities (issue 15): qk-layernorm, σReparam, z-loss, skip-step.

Each is a module-level function (it pickles: a trial may run in another
process) that changes a fresh trial, or returns None where it does not apply:
the model changes need an attention module that
:func:`gradwatch.probes.attention_read.find_attention` recognises
(``nn.MultiheadAttention`` and the Transformer layers, ``gradwatch.tinylm``,
Hugging Face GPT-2 and Llama-style attention); the z-loss needs class logits
(a model with attention or an LM head).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradwatch.doctor.surgery import OnModel
from gradwatch.probes.attention_read import find_attention, find_lm_head
from gradwatch.remedies import transformer as t
from gradwatch.trial import Trial


def qk_layernorm(m: nn.Module) -> nn.Module | None:
    """LayerNorm on each head's queries and keys (:func:`~gradwatch.remedies.transformer.add_qk_norm`), in place."""
    return t.add_qk_norm(m, inplace=True) if find_attention(m) else None


def sigma_reparam(m: nn.Module) -> nn.Module | None:
    """σReparam on every attention projection (:func:`~gradwatch.remedies.transformer.sigma_reparam`), in place."""
    return t.sigma_reparam(m, inplace=True) if find_attention(m) else None


def z_loss(trial: Trial, numbers: dict[str, float]) -> Trial | None:
    """The trial's loss plus 10⁻⁴·log²Z of the model's output logits (PaLM; Wortsman et al. 2023)."""
    if not (find_attention(trial.model) or find_lm_head(trial.model)):
        return None
    trial.loss_fn = t.with_z_loss(trial.loss_fn)
    return trial


def skip_step(trial: Trial, numbers: dict[str, float]) -> Trial:
    """Skip the optimizer steps whose total gradient norm is a robust outlier or non-finite (PaLM, OLMo 2)."""
    trial.skip_step = t.skip_step_on_spike(trial.optimizer)  # type: ignore[attr-defined]  # (the handle, for the user)
    return trial


def entries(one: Any) -> dict[str, Any]:
    """The catalogue's entries for these procedures (``one(key, label, apply)`` makes one entry)."""
    return {
        "qk_layernorm": one("qk_layernorm", "qk-layernorm", OnModel(qk_layernorm)),
        "sigma_reparam": one("sigma_reparam", "σReparam on the attention projections", OnModel(sigma_reparam)),
        "z_loss": one("z_loss", "z-loss 1e-4·log²Z", z_loss),
        "skip_step": one("skip_step", "skip steps on a gradient-norm spike", skip_step),
    }
