"""The zoo's named set-ups, in one read-only registry, and how to look one up."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType

from gradwatch.trial import Setup
from gradwatch.zoo import setups as s
from gradwatch.zoo.gan import GAN

# Steps the doctor's trials of the long adding tasks train (Setup.steps), measured without gradwatch
# (tests/test_tasks_and_remedies.py, slow): at T = 50 a GRU with Adam 10⁻² reaches a held-out score of 1.0 by
# step 250/750/500 on seeds 0/1/2; at T = 30 an LSTM with forget-gate bias 1 and Adam 10⁻³ by step 1000-1500
# (0.79-1.0 at 1000). In 300 steps every remedy ends at the loss of predicting the mean.
ADDING_STEPS = {50: 1000, 30: 1500}

_CLASSIC = (
    Setup(
        "deep_tanh_mlp",
        f"{s.DEPTH}-layer tanh MLP (width {s.WIDTH}, PyTorch's default init) on digits: the default "
        "init's weight gain (std 1/sqrt(3·fan_in)) times tanh' ≤ 1 shrinks the gradient at every layer",
        "vanishing",
        s.deep_tanh_mlp,
    ),
    Setup(
        "deep_relu_he_mlp",
        f"its healthy twin: the same {s.DEPTH} layers with ReLU and He initialisation",
        None,
        s.deep_relu_he_mlp,
    ),
    Setup(
        "deep_sigmoid_mlp",
        f"10-layer sigmoid MLP (width {s.WIDTH}, default init) on digits: sigmoid' ≤ 1/4 at every layer",
        "vanishing",
        s.deep_sigmoid_mlp,
    ),
    Setup(
        "saturated_tanh_mlp",
        f"8-layer tanh MLP initialised with weight std 8/sqrt(fan_in): the units sit in tanh's flat tails",
        "saturation",
        s.saturated_tanh_mlp,
    ),
    Setup(
        "dead_relu_mlp",
        "6-layer ReLU MLP whose hidden biases start at -1.5: most units never fire",
        "dead_units",
        s.dead_relu_mlp,
    ),
    Setup(
        "exploding_relu_mlp",
        f"{s.DEPTH}-layer ReLU MLP initialised at weight std 3/sqrt(fan_in), about twice He's: the back-propagated gradient grows ~2× per layer",
        "exploding",
        s.exploding_relu_mlp,
    ),
    Setup(
        "diverging_mlp",
        "6-layer ReLU MLP (He init) trained with SGD at learning rate 3: the loss overflows to NaN",
        "nonfinite",
        s.diverging_mlp,
    ),
    Setup(
        "stalled_mlp",
        "6-layer ReLU MLP whose first two layers sit in a parameter group with learning rate 10⁻⁶ of the rest",
        "stalled",
        s.stalled_mlp,
    ),
    Setup("layernorm_mlp", "healthy: 9-layer GELU MLP with LayerNorm before every activation", None,
          s.layernorm_mlp),
    Setup("small_resnet", "healthy: pre-activation ResNet (4 blocks, BatchNorm) on 8×8 digits", None,
          s.small_resnet),
    Setup("transformer_encoder", "healthy: 2-layer Transformer encoder reading digits row by row", None,
          partial(s.sequence_trial, "transformer")),
    Setup("lstm_rows", "healthy: LSTM reading digits row by row", None, partial(s.sequence_trial, "lstm")),
    Setup("rnn_vanishing", "vanilla tanh RNN on the adding task (T = 50) with W_hh = 0.5 × orthogonal: "
          "λ₁ = 0.5 < 1/γ, the gradient through time shrinks at least ×0.5 per step", "vanishing",
          partial(s.task_trial, "adding", 50, "rnn", recurrent_norm=0.5),
          steps=ADDING_STEPS[50]),
    Setup("rnn_exploding", "ReLU RNN on the adding task (T = 20) with W_hh = 2.5 × orthogonal: "
          "the gradient through time grows ~×1.8 per step", "exploding",
          partial(s.task_trial, "adding", 20, "rnn", recurrent_norm=2.5, nonlinearity="relu", lr=0.01)),
    Setup("lstm_adding", "healthy: LSTM (forget-gate bias 1) on the adding task, T = 10", None,
          partial(s.task_trial, "adding", 10, "lstm", lr=0.01, adam=True)),
    Setup("sigmoid_cnn", "8-layer plain sigmoid CNN on 8×8 digits, PyTorch's default init", "vanishing",
          s.sigmoid_cnn),
    Setup("exploding_resnet", "8-block residual CNN without normalisation, branch weights at std 2/sqrt(fan_in): "
          "every block adds a branch larger than its input", "exploding", s.exploding_resnet),
    Setup("closed_forget_lstm", "LSTM on the adding task (T = 30) with its forget-gate bias at −6: "
          "the cell forgets at every step", "vanishing", s.closed_forget_lstm, steps=ADDING_STEPS[30]),
    Setup("diverging_transformer", "2-layer Transformer encoder on digit rows, SGD at learning rate 20",
          "nonfinite", s.diverging_transformer),
    Setup("bn_cnn", "healthy: 8-layer CNN with BatchNorm and ReLU on 8×8 digits", None,
          s.bn_cnn),
    Setup("fixup_resnet", "healthy: the same residual CNN without normalisation, branches zero-initialised "
          "(Fixup)", None, s.fixup_resnet),
    Setup("gru_adding", "healthy: GRU on the adding task, T = 10", None,
          partial(s.task_trial, "adding", 10, "gru", lr=0.01, adam=True)),
    Setup("xavier_tanh_mlp", "healthy: 6-layer tanh MLP with Xavier initialisation (gain 5/3)", None,
          s.xavier_tanh_mlp),
    Setup("prenorm_transformer", "healthy: pre-LayerNorm Transformer encoder on digit rows", None,
          s.prenorm_transformer),
    Setup("residual_tanh_mlp", f"healthy: the {s.DEPTH}-layer tanh MLP with every Linear(64, 64) + tanh in a skip "
          "connection (gradwatch.remedies.add_residual)", None, s.residual_tanh_mlp),
    Setup("shallow_sigmoid_mlp", "healthy: 2-layer sigmoid MLP on digits", None,
          s.shallow_sigmoid_mlp),
)

SETUPS: Mapping[str, Setup] = MappingProxyType({setup.name: setup for setup in (*_CLASSIC, *GAN)})


def get(name: str) -> Setup:
    """The set-up of that name."""
    try:
        return SETUPS[name]
    except KeyError:
        raise KeyError(f"`zoo.get(name=…)` expects one of {sorted(SETUPS)}, got {name!r}") from None


def names() -> list[str]:
    """The set-ups' names, in the registry's order."""
    return list(SETUPS)
