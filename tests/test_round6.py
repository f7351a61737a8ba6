"""Set-ups of the sixth round nobody tuned gradwatch for (ported from papers and forum questions by a helper who
labelled them by plain measurement): what they broke, each checked on seeds 0–2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.zoo.data import batches, digits

from conftest import SEEDS


class NumpyCut(nn.Module):
    """A forward that applies "numpy's tanh" (Stack Overflow: "gradients are None for the first layers"): the round
    trip through ``.numpy()`` cuts the graph; ``numpy=False`` is the fix, ``torch.tanh``."""

    def __init__(self, numpy: bool) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, 10)
        self.numpy = numpy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.feat(x))
        h = torch.from_numpy(np.tanh(h.detach().numpy())) if self.numpy else torch.tanh(h)
        return self.head(h)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_layers_cut_off_from_the_graph_are_named_as_such(store, seed):
    """They were "stalled: too little gradient, or too small a learning rate", with Adam and normalisation offered.
    The reference: the layers' ``.grad`` by hand, None after the last backward; and the fixed forward quiet."""
    x, y, _, _ = digits()
    for cut in (True, False):
        torch.manual_seed(seed)
        model = NumpyCut(cut)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with gw.watch(model, opt, store=store, name=f"cut-{cut}-{seed}") as w:
            for (xb, yb), _ in zip(batches(x, y, 64, seed), range(300)):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss.detach())
        problems = w.diagnose().problems
        if cut:
            assert all(p.grad is None for p in model.feat.parameters())
            (f,) = problems
            assert f.layers == ("feat.0", "feat.2") and f.remedy_keys == ("check_graph",), str(w.diagnose())
            assert "graph is cut" in f.cause
        else:
            assert problems == [], str(w.diagnose())
