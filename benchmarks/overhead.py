"""Per-step overhead of a watch, as a ratio to the plain step measured in the same run.

    python benchmarks/overhead.py [--rounds 15] [--steps 20] [--only mlp|cnn|tinylm] [--norms]

Interleaved rounds (plain, A/A plain, each watch configuration, in turn),
each timing ``--steps`` training steps after a warm-up; the median per-step
time over rounds, and its ratio to plain. The A/A row (plain against plain)
shows the noise. Three clocks: wall time (what the issue's targets are stated
in), the process's CPU time (every thread: the store's writer thread counts)
and the training thread's CPU time (what the watch adds to the step itself,
the writer thread left out); the CPU clocks are disturbed less than the wall
clock on a machine shared with other jobs. The load
average is printed beside each model. The budgeted watch's rows come after a
warm-up past step 256, where its floor reaches every 64th step (its steady
state); the watch's own estimate of its overhead (``meta["budget"]``) is
printed beside them.

The flight recorder (``flight=``) and the attention probes (``attention=``,
budgeted; only models with attention) are on in the default watch; the row
"default watch, recorder and attention off" is the default before them. The
tinylm rows (``gradwatch.tinylm.TinyLM``, 4 layers, width 128, batch 8 × 64
tokens, AdamW) add the recorder alone (attention off) and the attention
probes every 10th step.

``--norms`` times ways to read the 40 gradient norms of the 20-layer MLP, in a
loop (hot caches) and inside a real training step (the optimizer's pre-step
hook, where the watch reads them: what the read adds to the step's thread
time, methods interleaved step by step). The two disagree: a loop rewards
copying small gradients into one stack, a real step, whose caches the
forward and backward passes have just filled with other data, much less.
"""

from __future__ import annotations

import argparse
import os
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
    "grad stats every step (every=1)": dict(every=1, activations=False, update_every=False),
    "grad stats alone, budgeted (every step to 127, then at least every 8th)": dict(activations=False,
                                                                                   update_every=False),
    "default watch, recorder and attention off": dict(flight=False, attention=False),
    "default watch (budget 2 %)": dict(),
    "budget=None (activations, updates every 10th)": dict(budget=None),
    "everything every step": dict(every=1, activations=1, update_every=1),
}


TINYLM_CONFIGS: dict[str, dict | None] = {
    **{k: v for k, v in CONFIGS.items() if k != "everything every step"},
    "default watch, recorder on, attention off": dict(attention=False),
    "recorder on, attention every 10th (budget 2 %)": dict(attention=10),
}


def tinylm_trial(seed: int) -> zoo.Trial:
    from gradwatch.tinylm import MarkovCopyLanguage, TinyLM

    torch.manual_seed(seed)
    model = TinyLM(64, 128, 4, 4, 64)
    lang = MarkovCopyLanguage(64, 64, markov=40)
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield lang.batch(8, g)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return zoo.Trial(model, opt, batches(), lambda logits, y: nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


def measure(make: Callable[[int], zoo.Trial], rounds: int, steps: int, warmup: int, store: str,
            configs: dict[str, dict | None] = CONFIGS) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict]:
    """(median wall, process-CPU and training-thread-CPU s/step, the budgeted watch's own estimate) per configuration.

    Rounds of ``steps`` steps take turns. (Not one step each: a budgeted watch reads its step time between two of its
    steps, which would then hold every other configuration's step too, and it would sample far more.) With
    ``--steps 64`` each round is one whole period of the budget's floor, its sampled step and two batches sent.
    """
    trials = {name: make(0) for name in configs}
    watches = {}
    for i, (name, kwargs) in enumerate(configs.items()):
        if kwargs is not None:
            t = trials[name]
            watches[name] = gw.watch(t.model, t.optimizer, store=store, name=f"w{i}", overwrite=True, **kwargs)
    for t in trials.values():
        for _ in range(warmup):
            t.step()
    wall: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    main: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, t in trials.items():
            w0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            for _ in range(steps):
                t.step()
            wall[name].append((time.perf_counter() - w0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
            main[name].append((time.thread_time() - m0) / steps)
    for w in watches.values():
        w.close()
    estimate = gw.open_run(watches["default watch (budget 2 %)"].path).meta.get("budget", {})
    return (*({n: statistics.median(v) for n, v in clock.items()} for clock in (wall, cpu, main)), estimate)


def norm_methods() -> None:
    """Time ways to read the 20-layer MLP's 40 gradient norms: in a loop, and what each adds to a real step."""
    from gradwatch.layers import anatomy
    from gradwatch.probes.grads import GradProbe
    from gradwatch.probes.stacked import StackedNorms

    trial = zoo.get("deep_tanh_mlp")(0)
    probe = GradProbe(anatomy(trial.model).layers)
    params = probe.params

    def reader(small: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """The watch's reader with stacks of same-shape gradients of at most ``small`` elements (0: none)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            if p.numel() <= small:
                by_shape.setdefault(tuple(p.shape), []).append(i)
        stacks = [idx for idx in by_shape.values() if len(idx) > 1]
        rest = [i for i in range(len(params)) if i not in {k for idx in stacks for k in idx}]
        shapes = [tuple(p.shape) for p in params]
        return StackedNorms(shapes, stacks, rest, params[0].dtype, None, params[0].device).read

    methods: dict[str, Callable[[list[torch.Tensor]], object]] = {
        "nothing read (the step alone)": lambda grads: None,
        "p.grad.norm().item() per parameter (a naive loop)": lambda grads: [float(g.norm()) for g in grads],
        "torch._foreach_norm + torch.stack": lambda grads: torch.stack(torch._foreach_norm(grads)),
        "the watch's reader, no stacks (one _foreach_norm into a kept block)": reader(0),
        "the watch's reader, stacks of ≤ 1024 elements (the biases)": reader(1024),
        f"the watch's reader, stacks of ≤ {GradProbe.SMALL} elements (the watch's choice)": reader(GradProbe.SMALL),
    }
    names = list(methods)
    trial.step()
    grads = [p.grad for p in params]
    loop: dict[str, float] = {}
    for name, fn in methods.items():
        for _ in range(30):
            fn(grads)
        runs = []
        for _ in range(9):
            t0 = time.thread_time()
            for _ in range(300):
                fn(grads)
            runs.append((time.thread_time() - t0) / 300)
        loop[name] = statistics.median(runs)
    # In a real step: the method of the step reads in the optimizer's pre-step hook; methods take turns step by step.
    turn = [0]

    def read_now(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        methods[names[turn[0] % len(names)]]([p.grad for p in params])

    trial.optimizer.register_step_pre_hook(read_now)
    for turn[0] in range(len(names) * 40):
        trial.step()
    step_time: dict[str, list[float]] = {name: [] for name in names}
    for turn[0] in range(len(names) * 600):
        t0 = time.thread_time()
        trial.step()
        step_time[names[turn[0] % len(names)]].append(time.thread_time() - t0)
    alone = statistics.median(step_time[names[0]])
    print(f"\nReading the 40 gradient norms of zoo deep_tanh_mlp (thread CPU time; a step alone {alone * 1e6:.0f} µs; "
          f"load {os.getloadavg()[0]:.1f}):\n")
    print("| method | µs per read, in a loop | µs added to a training step |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {loop[name] * 1e6:.1f} | {(statistics.median(step_time[name]) - alone) * 1e6:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", choices=["mlp", "cnn", "tinylm"], default=None)
    parser.add_argument("--norms", action="store_true", help="also time ways to read the MLP's gradient norms")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    models = {  # label: (set-up, warm-up steps)
        "zoo deep_tanh_mlp (20 layers, digits, batch 64)": (zoo.get("deep_tanh_mlp"), 300, "mlp"),
        "zoo deep_relu_he_mlp (20 layers, digits, batch 64)": (zoo.get("deep_relu_he_mlp"), 300, "mlp"),
        "mid-size CNN (6 conv + BN, 1.2 M params, 32×32, batch 32)": (cnn_trial, 40, "cnn"),
        "tinylm (4 layers, width 128, 0.8 M params, batch 8 × 64 tokens, AdamW)": (tinylm_trial, 260, "tinylm"),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU")
    print(f"{args.rounds} interleaved rounds × {args.steps} steps after the warm-up, median per-step time\n")
    print("| model | configuration | ms / step | wall ratio | CPU ratio | training-thread CPU ratio |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as store:
        for label, (make, warmup, kind) in models.items():
            if args.only and args.only != kind:
                continue
            load0 = os.getloadavg()[0]
            configs = TINYLM_CONFIGS if kind == "tinylm" else CONFIGS
            wall, cpu, main, estimate = measure(make, args.rounds, args.steps, warmup, store, configs)
            for name in configs:
                note = ""
                if name == "default watch (budget 2 %)" and estimate.get("overhead") is not None:
                    note = f" (own estimate {1 + estimate['overhead']:.3f}×{'' if estimate['kept'] else ', not kept'})"
                print(f"| {label} | {name}{note} | {wall[name] * 1e3:.2f} | {wall[name] / wall['plain']:.3f}× | "
                      f"{cpu[name] / cpu['plain']:.3f}× | {main[name] / main['plain']:.3f}× |", flush=True)
            print(f"| {label} | (load average {load0:.1f} → {os.getloadavg()[0]:.1f}; warm-up {warmup} steps) | | | | |",
                  flush=True)
    if args.norms:
        norm_methods()


if __name__ == "__main__":
    main()
