"""Time of ``gw.check`` against one forward+backward pass of the same model, on the CPU.

    python benchmarks/check_speed.py [--repeats 5]

Models: a 100-layer tanh MLP of width 256 (batch 64) and a ResNet-style CNN
(the zoo's, widened: 32 channels, 8 blocks, 32×32 inputs, batch 32). Medians
over repeats; the target is under 2 s for the 100-layer MLP on this CPU.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

import gradwatch as gw
from gradwatch.zoo import ResidualBlock


def mlp100() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(99):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(256, 10)), torch.randn(64, 256)


def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), *[ResidualBlock(32) for _ in range(8)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, torch.randn(32, 3, 32, 32)


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU; "
          f"median of {args.repeats}\n")
    print("| model | forward+backward | gw.check (4 Jacobian samples) | ratio | gw.check without spectrum | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, make in (("100-layer tanh MLP, width 256, batch 64", mlp100),
                        ("ResNet-style CNN, 8 blocks × 32 ch, 32×32, batch 32", resnet)):
        model, x = make()

        def step() -> None:
            model.zero_grad()
            model(x).sum().backward()

        base = timed(step, args.repeats)
        full = timed(lambda: gw.check(model, x), args.repeats)
        bare = timed(lambda: gw.check(model, x, samples=0), args.repeats)
        print(f"| {label} | {base * 1e3:.0f} ms | {full * 1e3:.0f} ms | {full / base:.1f}× | {bare * 1e3:.0f} ms | "
              f"{bare / base:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
