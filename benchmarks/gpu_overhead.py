"""What watching costs on a GPU: ResNet-50 and GPT-2 small, bf16 autocast, against the plain step.

Run on a CUDA machine (the device tool), e.g.

    python benchmarks/gpu_overhead.py --out "$OUT"

Per-step time is taken with CUDA events around forward, backward, the variant's
extra work and the optimizer step; each variant runs ``--steps`` steps per
round, the variants in a fresh random order every round, and the figure is
the median step over all rounds, as a ratio to the plain step's median.
"plain (A/A)" is the plain step measured again as a variant of its own: its
distance from 1 is the noise floor. The floor row is the time to read every
gradient once (one fused norm, nothing copied), as a share of the plain step.
Writes ``gpu_overhead.md`` (the table) and ``gpu_overhead.json`` under --out.

``--smoke`` runs tiny models on the CPU with a few steps: it checks the script,
not the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import gradwatch as gw  # noqa: E402


# -- the models ------------------------------------------------------------------------------

def resnet50(device: torch.device, smoke: bool) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], Any]]:
    import torchvision

    model = torchvision.models.resnet50(num_classes=1000 if not smoke else 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch, size = (128, 224) if not smoke else (2, 32)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000 if not smoke else 10, (batch,), device=device)
    return model, opt, lambda: nn.functional.cross_entropy(model(x), y)


def gpt2(device: torch.device, smoke: bool) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], Any]]:
    import transformers

    config = transformers.GPT2Config() if not smoke else transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2)
    model = transformers.GPT2LMHeadModel(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, length = (16, 1024) if not smoke else (2, 64)
    tokens = torch.randint(0, config.vocab_size, (batch, length), device=device)
    return model, opt, lambda: model(input_ids=tokens, labels=tokens).loss


# -- what runs between backward and the optimizer step ------------------------------------------

def nothing(model: nn.Module) -> None:
    return None


def clip(model: nn.Module) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)


def item_loop(model: nn.Module) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.norm().item()


def lightning_grad_norm(model: nn.Module) -> None:
    from lightning.pytorch.utilities import grad_norm

    {k: float(v) for k, v in grad_norm(model, norm_type=2).items()}  # what logging them costs: one read each


def histograms(model: nn.Module) -> None:  # what wandb.watch(log="gradients") computes
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.float()
            torch.histc(g, bins=64, min=float(g.min()), max=float(g.max()))


EXTRA = {"plain": nothing, "plain (A/A)": nothing, "clip_grad_norm_": clip, "p.grad.norm().item() loop": item_loop,
         "Lightning grad_norm": lightning_grad_norm, "64-bin histc per parameter": histograms}
WATCHES = {  # gradwatch variants: watch(...) keyword arguments
    "gradwatch: gradient statistics every step": dict(every=1, activations=False, update_every=False),
    "gradwatch: default schedule (activations, updates every 10th)": dict(budget=None),
    "gradwatch: activation statistics every step": dict(every=1, activations=1, update_every=False),
}


def measure(build: Callable, device: torch.device, rounds: int, steps: int, smoke: bool, store: Path) -> dict:
    model, opt, loss_fn = build(device, smoke)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    cuda = device.type == "cuda"

    def one_step(extra: Callable[[nn.Module], None]) -> None:
        with autocast:
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        extra(model)
        opt.step()

    def timed(extra: Callable[[nn.Module], None]) -> list[float]:
        if not cuda:
            out = []
            for _ in range(steps):
                t = time.perf_counter()
                one_step(extra)
                out.append((time.perf_counter() - t) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            one_step(extra)
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    for _ in range(3):  # warm-up: kernels chosen, allocator settled
        one_step(nothing)
    variants = list(EXTRA) + list(WATCHES)
    times: dict[str, list[float]] = {v: [] for v in variants}
    k = 0
    for r in range(rounds):
        order = variants[:]
        random.Random(r).shuffle(order)
        for v in order:
            if v in WATCHES:
                k += 1
                with gw.watch(model, opt, store=store, name=f"{type(model).__name__}-{k}", **WATCHES[v]):
                    one_step(nothing)  # the first step settles the layer order: not timed
                    times[v] += timed(nothing)
            else:
                times[v] += timed(EXTRA[v])
        print(f"  round {r + 1}/{rounds}", flush=True)
    median = {v: statistics.median(t) for v, t in times.items()}
    base = median["plain"]
    # the floor: read every gradient once
    one_step(nothing)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    floor = []
    for _ in range(20):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch._foreach_norm(grads)
            e.record()
            torch.cuda.synchronize()
            floor.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            torch._foreach_norm(grads)
            floor.append((time.perf_counter() - t) * 1e3)
    return {"step_ms": base, "ratio": {v: m / base for v, m in median.items()},
            "floor_frac": statistics.median(floor) / base, "samples": {v: len(t) for v, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="directory for the table and JSON")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant per round (default 15)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument("--models", default="resnet50,gpt2", help="comma-separated: resnet50, gpt2")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark is for a GPU (use --smoke to check the script on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: not a measurement)"
    builders = {"resnet50": resnet50, "gpt2": gpt2}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name not in builders:
                ap.error(f"--models: unknown model {name!r}; expected resnet50 and/or gpt2")
            print(f"{name} on {card}", flush=True)
            results[name] = measure(builders[name], device, args.rounds, args.steps, args.smoke, Path(tmp))
    names = list(results)
    lines = [f"Card: {card}; torch {torch.__version__}; medians of {args.rounds} interleaved rounds × "
             f"{args.steps} steps (CUDA events); ratios to the plain step of the same run.", "",
             "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             "| plain step (ms) | " + " | ".join(f"{results[n]['step_ms']:.1f}" for n in names) + " |"]
    for v in results[names[0]]["ratio"]:
        lines.append(f"| {v} | " + " | ".join(f"{results[n]['ratio'][v]:.3f}×" for n in names) + " |")
    lines.append("| floor: read every gradient once, share of the plain step | "
                 + " | ".join(f"{results[n]['floor_frac']:.1%}" for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_overhead.md").write_text(table + "\n")
    (args.out / "gpu_overhead.json").write_text(json.dumps({"card": card, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
