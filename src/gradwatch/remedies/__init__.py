"""Remedies: plain functions that transform a model, optimizer or loss, each naming its source."""

from gradwatch.remedies.recurrent import (
    clip_grad_norm,
    irnn,
    lstm_forget_bias,
    orthogonal_recurrent,
    pascanu_regularizer,
    smart_init,
)

__all__ = ["clip_grad_norm", "irnn", "lstm_forget_bias", "orthogonal_recurrent", "pascanu_regularizer", "smart_init"]
