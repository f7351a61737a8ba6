"""Remedies: plain functions that transform a model, optimizer or loss, each naming its source.

Model remedies return a deep copy unless ``inplace=True``; optimizer remedies
act on the optimizer they are given (a hook, removable through the returned
handle, or its param groups).
"""

from gradwatch.remedies.clipping import adaptive_clip, agc_, clip_grad_norm, clip_grad_value, scale_lr, unify_lr
from gradwatch.remedies.init import (fixup_zero_init, he_init, lecun_init, lsuv_init, one_factor_init, orthogonal_init,
                                     xavier_init, zero_factors)
from gradwatch.remedies.recurrent import (irnn, lstm_chrono_init, lstm_forget_bias, orthogonal_recurrent,
                                          pascanu_regularizer, smart_init)
from gradwatch.remedies.riemannian import RiemannianAdam, RiemannianSGD, recurrent_groups
from gradwatch.remedies.structure import (
    SATURATING, Residual, ResidualBlock, ReZero, add_norm, add_positions, add_residual, after_last_layer,
    gumbel_temperature,
    output_activations, swap_activation,
)

__all__ = [
    "ReZero", "Residual", "ResidualBlock", "RiemannianAdam", "RiemannianSGD", "adaptive_clip", "add_norm", "add_positions", "add_residual",
    "after_last_layer",
    "agc_", "clip_grad_norm", "clip_grad_value", "fixup_zero_init", "gumbel_temperature", "he_init", "irnn",
    "lecun_init", "lsuv_init", "lstm_chrono_init",
    "lstm_forget_bias", "one_factor_init",
    "orthogonal_init", "orthogonal_recurrent", "output_activations", "pascanu_regularizer", "recurrent_groups",
    "SATURATING", "scale_lr", "smart_init", "swap_activation", "unify_lr", "xavier_init", "zero_factors",
]
