"""Per-step overhead of a watch, as a ratio to the plain step measured in the same run.

    python benchmarks/overhead.py [--rounds 15] [--steps 20]

Interleaved rounds (plain, A/A plain, each watch configuration, in turn),
each timing ``--steps`` training steps; the median per-step time over rounds,
and its ratio to plain. The A/A row (plain against plain) shows the noise.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import gradwatch as gw
from gradwatch import zoo


def mid_cnn() -> nn.Module:
    """A mid-size CNN for 32×32 RGB inputs: 4 conv blocks with BatchNorm, ~1.2 M parameters."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32), *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
        *block(128, 256), *block(256, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )


def cnn_trial(seed: int) -> zoo.Trial:
    torch.manual_seed(seed)
    model = mid_cnn()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

    def batches():
        while True:
            yield x, y

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return zoo.Trial(model, opt, batches(), nn.functional.cross_entropy)


CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "plain (A/A)": None,
    "grad stats every step": dict(every=1, activations=False, update_every=False),
    "default schedule (+activations, updates every 10th)": dict(),
    "everything every step": dict(every=1, activations=1, update_every=1),
}


def measure(make: Callable[[int], zoo.Trial], rounds: int, steps: int, store: str) -> dict[str, float]:
    trials = {name: make(0) for name in CONFIGS}
    watches = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        if kwargs is not None:
            t = trials[name]
            watches[name] = gw.watch(t.model, t.optimizer, store=store, name=f"w{i}", overwrite=True, **kwargs)
    for t in trials.values():  # warm-up
        for _ in range(3):
            t.step()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, t in trials.items():
            start = time.perf_counter()
            for _ in range(steps):
                t.step()
            times[name].append((time.perf_counter() - start) / steps)
    for w in watches.values():
        w.close()
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    models = {
        "zoo deep_tanh_mlp (20 layers, digits, batch 64)": zoo.get("deep_tanh_mlp"),
        "zoo deep_relu_he_mlp (20 layers, digits, batch 64)": zoo.get("deep_relu_he_mlp"),
        "mid-size CNN (6 conv + BN, 1.2 M params, 32×32, batch 32)": cnn_trial,
    }
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU")
    print(f"{args.rounds} interleaved rounds × {args.steps} steps, median per-step time\n")
    print("| model | configuration | ms / step | ratio to plain |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as store:
        for label, make in models.items():
            med = measure(make, args.rounds, args.steps, store)
            base = med["plain"]
            for name, t in med.items():
                print(f"| {label} | {name} | {t * 1e3:.2f} | {t / base:.3f}× |", flush=True)


if __name__ == "__main__":
    main()
