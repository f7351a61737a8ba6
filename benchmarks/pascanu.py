"""A reduced-scale reproduction of Pascanu, Mikolov & Bengio (2013): success rate against sequence length.

    python benchmarks/pascanu.py                 # CPU: ~10 minutes on 2 cores
    python benchmarks/pascanu.py --scale large   # the larger setting, for a GPU machine
    python benchmarks/pascanu.py --methods vanilla orthogonal Riemannian --tasks adding temporal_order --lengths 40

Methods: vanilla tanh RNN; + gradient-norm clipping (SGD-C); + clipping and
the norm-preserving regulariser Ω (SGD-CR); orthogonal recurrent weights kept
orthogonal (expRNN-style parametrisation, with clipping); Riemannian (W_hh
initialised orthogonal and kept on the manifold by gradwatch.remedies.RiemannianAdam:
tangent projection, Adam step, QR retraction; the other weights take Adam's
step; with clipping); LSTM (forget-gate bias 1, with clipping). A run succeeds when fewer than 1 % of 1,000 held-out
sequences are wrong (Pascanu et al.'s criterion). Writes the table (markdown)
to stdout and the gradient-vs-lag plot to benchmarks/pascanu_lag.png.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

import gradwatch as gw
from gradwatch import remedies
from gradwatch.diagnosis.measures import by_lag
from gradwatch.tasks import task
from gradwatch.zoo import TaskRNN

METHODS = ("vanilla", "SGD-C", "SGD-CR", "orthogonal", "Riemannian", "LSTM")
SCALES = {
    "cpu": dict(lengths=(10, 20, 40), seeds=2, steps=1500, hidden=32, batch=32, tasks=("adding", "temporal_order", "copy")),
    "large": dict(lengths=(25, 50, 100, 200), seeds=5, steps=20000, hidden=100, batch=64,
                  tasks=("adding", "temporal_order", "copy")),
}
CLIP, ALPHA, LR = 1.0, 2.0, 3e-3


def build(method: str, name: str, hidden: int) -> TaskRNN:
    t = task(name)
    model = TaskRNN("lstm" if method == "LSTM" else "rnn", t.n_in, hidden, t.n_out, t.output)
    if method == "LSTM":
        remedies.lstm_forget_bias(model.rnn)  # type: ignore[arg-type]
    if method == "orthogonal":
        remedies.orthogonal_recurrent(model.rnn)
    if method == "Riemannian":
        torch.nn.init.orthogonal_(model.rnn.weight_hh_l0)  # type: ignore[arg-type]  # start on the manifold
    if method == "SGD-CR":
        model.unrolled = True  # Ω needs every hidden state
    return model


def train(method: str, name: str, T: int, seed: int, cfg: dict) -> float:
    """Train one run; returns its error rate on 1,000 held-out sequences."""
    torch.manual_seed(seed)
    t = task(name)
    model = build(method, name, cfg["hidden"])
    opt: torch.optim.Optimizer
    if method == "Riemannian":
        opt = remedies.RiemannianAdam(remedies.recurrent_groups(model), lr=LR)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=LR)
    if method != "vanilla":
        remedies.clip_grad_norm(opt, CLIP)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg["steps"]):
        x, y = t.generate(cfg["batch"], T, g)
        loss = t.loss(model(x), y)
        if method == "SGD-CR":
            loss = loss + ALPHA * remedies.pascanu_regularizer(model.last_runs, loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.unrolled = False
    x, y = t.generate(1000, T, torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        return t.error_rate(model(x), y)


def lag_plot(path: Path, T: int = 40) -> None:
    """‖∂L/∂h_t‖ against the lag, at initialisation, for each method on the adding task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    t = task("adding")
    for method in METHODS:
        torch.manual_seed(0)
        model = build(method, "adding", 32)
        model.unrolled = False
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with gw.watch(model, opt, temporal=True, activations=1, store=path.parent / "out", name=f"lag-{method}",
                      overwrite=True) as w:
            x, y = t.generate(64, T, torch.Generator().manual_seed(1))
            t.loss(model(x), y).backward()
            opt.step()
        s = by_lag(w.open().temporal("rnn.l0"))  # rows: lags, the last is lag 0
        prof = s.values[:, 0]
        ax.semilogy([int(lag) for lag in s.names], prof / prof[-1], label=method)
    ax.set_xlabel("lag (steps before the end)")
    ax.set_ylabel("‖∂L/∂h_t‖ / ‖∂L/∂h_T‖")
    ax.set_title(f"gradient through time at initialisation, adding task, T = {T}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--steps", type=int, help="override the training steps per run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="only these methods (default: all)")
    parser.add_argument("--tasks", nargs="+", help="only these tasks (default: the scale's)")
    parser.add_argument("--lengths", nargs="+", type=int, help="only these lengths T (default: the scale's)")
    parser.add_argument("--no-plot", action="store_true", help="skip the gradient-vs-lag plot")
    args = parser.parse_args()
    cfg = dict(SCALES[args.scale])
    if args.steps:
        cfg["steps"] = args.steps
    for key in ("tasks", "lengths"):
        if getattr(args, key):
            cfg[key] = tuple(getattr(args, key))
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}; "
          f"scale {args.scale}: {cfg['steps']} Adam steps (lr {LR}) of batch {cfg['batch']}, hidden {cfg['hidden']}, "
          f"{cfg['seeds']} seeds; clip {CLIP}, Ω weight {ALPHA}\n")
    start = time.time()
    for name in cfg["tasks"]:
        methods = METHODS if name != "copy" else ("vanilla", "SGD-C", "LSTM")
        methods = tuple(m for m in methods if not args.methods or m in args.methods)
        print(f"\n**{name}** — success (error < 1 %) over seeds, and the mean error rate; chance error "
              f"{task(name).chance_error:.2f}\n")
        print("| method | " + " | ".join(f"T = {T}" for T in cfg["lengths"]) + " |")
        print("|---|" + "---:|" * len(cfg["lengths"]))
        for method in methods:
            cells = []
            for T in cfg["lengths"]:
                errors = [train(method, name, T, seed, cfg) for seed in range(cfg["seeds"])]
                ok = sum(e < 0.01 for e in errors)
                cells.append(f"{ok}/{cfg['seeds']} ({np.mean(errors):.2f})")
            print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    if not args.no_plot:
        lag_plot(Path(__file__).parent / "pascanu_lag.png")
    print(f"\n{time.time() - start:.0f} s in all" + ("" if args.no_plot else "; plot: benchmarks/pascanu_lag.png"))


if __name__ == "__main__":
    main()
