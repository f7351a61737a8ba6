"""Named, seeded, small set-ups that show each pathology and its healthy twin.

Every set-up builds from a seed with nothing downloaded: data comes from
scikit-learn's bundled sets or is synthetic. A :class:`Setup` makes a fresh
:class:`~gradwatch.trial.Trial` (model, optimizer, batches, loss) per seed,
so that trials of the same set-up start identical. The package, by concern:

- :mod:`~gradwatch.zoo.data` — the digits, their batches, and the one digits trial builder;
- :mod:`~gradwatch.zoo.models` — the zoo's model classes;
- :mod:`~gradwatch.zoo.setups` — how each named set-up is built from a seed;
- :mod:`~gradwatch.zoo.gan` — GANs on 2-D Gaussian mixtures, their trial and metrics;
- :mod:`~gradwatch.zoo.registry` — :data:`SETUPS` (read-only), :func:`get`, :func:`names`;
- :mod:`~gradwatch.zoo.train` — :func:`train_watched`.

The core never imports the zoo; the zoo is built from the core's pieces.
"""

from gradwatch.remedies.structure import ResidualBlock
from gradwatch.trial import Batch, Setup, Trial
from gradwatch.zoo.data import digits, digits_trial
from gradwatch.zoo.gan import GANTrial, gan_trial, mixture_centers, mode_metrics
from gradwatch.zoo.models import DigitsCNN, PlainResBlock, PlainResNet, RowSequenceModel, SmallResNet, TaskRNN, mlp
from gradwatch.zoo.registry import SETUPS, get, names
from gradwatch.zoo.train import train_watched

__all__ = [
    "SETUPS", "Batch", "DigitsCNN", "GANTrial", "PlainResBlock", "PlainResNet", "ResidualBlock", "RowSequenceModel",
    "Setup", "SmallResNet", "TaskRNN", "Trial", "digits", "digits_trial", "gan_trial", "get", "mixture_centers", "mlp",
    "mode_metrics", "names", "train_watched",
]
