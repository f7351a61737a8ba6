"""A long run under a watch: is memory flat, and how large is the store?

    python benchmarks/long_run.py [--steps 10000]

A 4-layer tanh MLP (width 64) trained with Adam under the default schedule
(gradient norms every step; activations, ‖∂L/∂a‖ and update ratios every
10th) and `watch.log(loss=…)`. Python-heap growth (tracemalloc) and the
process's resident memory are read after 10 % of the steps and at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from torch import nn

import gradwatch as gw


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 16), torch.randn(256, 1)
    tracemalloc.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        with gw.watch(model, opt, store=store, name="long") as w:
            for step in range(args.steps):
                idx = torch.randint(0, 256, (32,))
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss)
                if step + 1 == args.steps // 10:
                    w.flush()
                    heap0, rss0 = tracemalloc.get_traced_memory()[0], rss_mib()
            w.flush()
            heap1, rss1 = tracemalloc.get_traced_memory()[0], rss_mib()
        db = Path(w.path) / "gradwatch.sqlite"
        size = db.stat().st_size
        with gw.open_run(w.path) as run:
            n = len(run.records()["step"])
    seconds = time.perf_counter() - start
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU\n")
    print("| steps | Python heap growth, 10 % → 100 % of steps | RSS growth | store size | records | bytes / record | time |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.steps} | {(heap1 - heap0) / 1024:.0f} KiB | {rss1 - rss0:.1f} MiB | {size / 2**20:.1f} MiB | {n} | "
          f"{size / n:.0f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
