"""The remedies a finding can name: one vocabulary for the diagnosis, gw.check and the doctor."""

from __future__ import annotations

REMEDIES = {
    "relu": "swap tanh/sigmoid for ReLU-type activations (ReLU, GELU, SiLU)",
    "leaky": "use a ReLU variant that never dies (LeakyReLU, GELU, SiLU)",
    "he_init": "He (Kaiming) initialisation for ReLU-type nets",
    "orthogonal_init": "orthogonal or Xavier initialisation, or LSUV (Mishkin & Matas 2016)",
    "smaller_init": "smaller initial weights (Xavier/orthogonal, or LSUV to unit variance)",
    "zero_bias": "initialise biases at zero",
    "residual": "residual connections around blocks",
    "norm": "normalisation (BatchNorm/LayerNorm) before the activations",
    "clip_norm": "gradient-norm clipping (torch.nn.utils.clip_grad_norm_, Pascanu et al. 2013)",
    "lower_lr": "a lower learning rate (or warm-up)",
    "check_data": "check the inputs and the loss for NaN/Inf, and log/division/sqrt of values near 0",
    "grad_scaler": "with float16, torch.amp.GradScaler",
    "bf16": "bfloat16 autocast in place of float16 (float32's range: no loss scaling, no skipped steps)",
    "orthogonal_rnn": "orthogonal recurrent weights kept orthogonal (gradwatch.remedies.orthogonal_recurrent)",
    "gated": "an LSTM or GRU in place of the vanilla cell (forget-gate bias 1)",
    "pascanu_reg": "Pascanu's norm-preserving regulariser Ω (gradwatch.remedies.pascanu_regularizer)",
    "forget_bias": "an LSTM forget-gate bias of 1 (Gers et al. 2000; gradwatch.remedies.lstm_forget_bias)",
    "irnn": "identity-initialised ReLU RNN (gradwatch.remedies.irnn, Le et al. 2015)",
    "smaller_w_hh": "recurrent weights with spectral radius below 1 (gradwatch.remedies.smart_init)",
    "nonsaturating": "for a GAN generator, the non-saturating loss −log D(G(z)) (Goodfellow et al. 2014)",
    "param_groups": "check the optimizer's parameter groups: learning rate and weight decay of these layers",
}


def remedies(*keys: str) -> tuple[str, ...]:
    return tuple(REMEDIES[k] for k in keys)
