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
import contextlib
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
ALONE: dict[str, Any] = dict(activations=False, update_every=False, attention=False, flight=False)  # one at a time
# gradwatch variants, timed interleaved with the rest: watch(...) keyword arguments
WATCHES: dict[str, dict[str, Any]] = {
    "gradwatch: gradient statistics every step": dict(every=1, **ALONE),
    "gradwatch: activation statistics every step": dict(every=1, **{**ALONE, "activations": 1}),
    "gradwatch: attention probes every step": dict(every=1, **{**ALONE, "attention": 1}),
    "gradwatch: flight recorder (every step's norms in a ring)": dict(every=1, **{**ALONE, "flight": True}),
    "gradwatch: fixed schedule, budget=None (activations, updates every 10th)": dict(budget=None),
}
ATTENTION_ONLY = {"gradwatch: attention probes every step"}  # rows that mean nothing on a model without attention
STEADY = "gradwatch: default watch (2 % budget), settled"  # timed on its own: see measure_steady
TARGETS = {"gradwatch: gradient statistics every step": 1.01, STEADY: 1.02,
           "gradwatch: fixed schedule, budget=None (activations, updates every 10th)": 1.02,
           "gradwatch: activation statistics every step": 1.10}  # the targets (activations: on ResNet-50)


class Bench:
    """One model's step, timed per step (CUDA events on a GPU, the host clock on the CPU)."""

    def __init__(self, build: Callable, device: torch.device, smoke: bool) -> None:
        self.model, self.opt, self.loss_fn = build(device, smoke)
        self.name = type(self.model).__name__  # run names in the shared store: one model's never clash with another's
        self.cuda = device.type == "cuda"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def one_step(self, extra: Callable[[nn.Module], None] = nothing) -> None:
        with self.autocast:
            loss = self.loss_fn()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        extra(self.model)
        self.opt.step()

    def timed(self, steps: int, extra: Callable[[nn.Module], None] = nothing) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(steps):
                t = time.perf_counter()
                self.one_step(extra)
                out.append((time.perf_counter() - t) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            self.one_step(extra)
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    def has_attention(self) -> bool:
        return any("Attention" in type(m).__name__ for m in self.model.modules())


def summary(times: dict[str, list[float]], base: str = "plain") -> dict[str, dict[str, float]]:
    """Median and mean step of each variant, as ratios to `base`'s (the mean counts a schedule's sampled steps)."""
    med0, mean0 = statistics.median(times[base]), statistics.fmean(times[base])
    return {v: {"median": statistics.median(t) / med0, "mean": statistics.fmean(t) / mean0, "steps": len(t)}
            for v, t in times.items()}


def measure(bench: Bench, rounds: int, steps: int, store: Path, only: set[str] | None,
            baselines: list[str] | None = None) -> dict:
    """The interleaved rounds: every variant `steps` steps per round, in a fresh random order each round."""
    for _ in range(3):  # warm-up: kernels chosen, allocator settled
        bench.one_step()
    watches = {v: kw for v, kw in WATCHES.items() if (v not in ATTENTION_ONLY or bench.has_attention())
               and (only is None or v in only)}
    variants = [v for v in EXTRA if baselines is None or v in ("plain", *baselines)] + list(watches)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[:]
        random.Random(r).shuffle(order)
        for v in order:
            if v in watches:
                name = f"{bench.name}-r{r}-{variants.index(v)}"
                with gw.watch(bench.model, bench.opt, store=store, name=name, **watches[v]):
                    bench.one_step()  # the first step settles the layer order: not timed
                    times[v] += bench.timed(steps)
            else:
                times[v] += bench.timed(steps, EXTRA[v])
        print(f"  round {r + 1}/{rounds}", flush=True)
    return {"step_ms": statistics.median(times["plain"]), "ratio": summary(times)}


def measure_steady(bench: Bench, steps: int, after: int, store: Path) -> dict:
    """The default watch once its budget has settled: `after` steps untimed, then `steps` timed, plain either side.

    A watch records gradient norms on every step for its first 128 steps, keeps the other families at least every
    16th step to step 127 and every 32nd to step 255, and revises its schedules every 16 steps, so the interleaved
    rounds (16 steps per watch) never see how it runs for the rest of a long run; plain blocks of `steps` / 4 steps
    before and after (A-B-A) give the baseline.
    """
    before = bench.timed(max(1, steps // 4))
    with gw.watch(bench.model, bench.opt, store=store, name=f"{bench.name}-steady") as w:
        for _ in range(after):
            bench.one_step()
        watched = bench.timed(steps)
    later = bench.timed(max(1, steps // 4))
    meta = gw.open_run(w.path).meta
    ratio = summary({"plain": before + later, STEADY: watched})[STEADY]
    return {"ratio": ratio, "budget": meta.get("budget"),
            "schedules": {k: v.get("schedule") for k, v in (meta.get("schedules") or {}).items()}}


def read_floor(bench: Bench) -> float:
    """Milliseconds to read every gradient once (one fused norm, nothing copied)."""
    bench.one_step()
    grads = [p.grad for p in bench.model.parameters() if p.grad is not None]
    floor = []
    for _ in range(20):
        if bench.cuda:
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
    return statistics.median(floor)


def inspect_watch(bench: Bench, store: Path, variants: list[str]) -> str:
    """Where each watch variant makes the host wait for the device, and a profile of its steps, as text.

    Host synchronisations are caught with ``torch.cuda.set_sync_debug_mode("warn")`` during 3 watched steps (the
    Python frames inside gradwatch that issued each); the profile is ``torch.profiler``'s table over 4 steps.
    """
    import traceback
    import warnings

    from torch.profiler import ProfilerActivity, profile

    out: list[str] = []
    for v in variants:
        watching = (contextlib.nullcontext() if v == "plain" else
                    gw.watch(bench.model, bench.opt, store=store, name=f"{bench.name}-inspect-{len(out)}",
                             **WATCHES.get(v, {})))
        with watching:
            for _ in range(2):
                bench.one_step()
            syncs: dict[str, int] = {}

            def note(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
                frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                          if "gradwatch" in f.filename]
                key = f"{str(message)[:60]} <- {' / '.join(frames[-3:]) or filename + ':' + str(lineno)}"
                syncs[key] = syncs.get(key, 0) + 1

            if bench.cuda:
                with warnings.catch_warnings():  # (restores showwarning on the way out)
                    warnings.simplefilter("always")
                    warnings.showwarning = note
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        for _ in range(3):
                            bench.one_step()
                        torch.cuda.synchronize()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
            with profile(activities=acts) as prof:
                for _ in range(4):
                    bench.one_step()
                if bench.cuda:
                    torch.cuda.synchronize()
        by = "self_cuda_time_total" if bench.cuda else "self_cpu_time_total"
        out += [f"## {v}", "", "host synchronisations in 3 steps (count, what, gradwatch frames):"]
        out += [f"  {n} × {k}" for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])] or ["  none"]
        out += ["", prof.key_averages().table(sort_by=by, row_limit=25),
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="directory for the table and JSON")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant per round (default 15)")
    ap.add_argument("--steady-steps", type=int, default=128,
                    help="timed steps of the default watch once settled (default 128; 0: skip that row)")
    ap.add_argument("--steady-after", type=int, default=256,
                    help="untimed watched steps before those (default 256: past the gradient norms' dense start "
                         "and the floor's every-32nd stretch; see gradwatch.schedules.floor_gap)")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument("--models", default="resnet50,gpt2", help="comma-separated: resnet50, gpt2")
    ap.add_argument("--only", nargs="*", metavar="VARIANT", help="gradwatch variants to time (default: all of WATCHES)")
    ap.add_argument("--baselines", nargs="*", metavar="VARIANT",
                    help="the other variants to time besides the plain step (default: all of EXTRA)")
    ap.add_argument("--inspect", nargs="*", metavar="VARIANT", default=None,
                    help="variants whose host synchronisations and profile go to inspect_<model>.txt "
                         "('plain' for the plain step; default: plain, gradient and activation statistics)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark is for a GPU (use --smoke to check the script on the CPU)")
    builders = {"resnet50": resnet50, "gpt2": gpt2}
    models = args.models.split(",")
    for name in models:
        if name not in builders:
            ap.error(f"--models: unknown model {name!r}; expected resnet50 and/or gpt2")
    for v in (args.only or []) + (args.inspect or []):
        if v not in WATCHES and v != "plain":
            ap.error(f"--only/--inspect: unknown variant {v!r}; expected one of {['plain', *WATCHES]}")
    for v in args.baselines or []:
        if v not in EXTRA:
            ap.error(f"--baselines: unknown variant {v!r}; expected some of {list(EXTRA)}")
    inspect = args.inspect if args.inspect is not None else ["plain", *list(WATCHES)[:2]]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run: not a measurement)"
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            print(f"{name} on {card}", flush=True)
            started = time.perf_counter()
            bench = Bench(builders[name], device, args.smoke)
            res = measure(bench, args.rounds, args.steps, Path(tmp), set(args.only) if args.only else None,
                          args.baselines)
            if args.steady_steps:
                print(f"  the default watch, {args.steady_steps} steps after its first {args.steady_after}", flush=True)
                steady = measure_steady(bench, args.steady_steps, args.steady_after, Path(tmp))
                res["ratio"][STEADY] = steady["ratio"]
                res["budget"], res["schedules"] = steady["budget"], steady["schedules"]
            res["floor_frac"] = read_floor(bench) / res["step_ms"]
            res["seconds"] = time.perf_counter() - started
            results[name] = res
            # written after each model's timings, before its profiles: a run cut short keeps every model it timed
            (args.out / "gpu_overhead.json").write_text(json.dumps({"card": card, "torch": torch.__version__,
                                                                    "results": results}, indent=1))
            table = render(results, card, args.rounds, args.steps, args.steady_steps, args.steady_after)
            (args.out / "gpu_overhead.md").write_text(table + "\n")
            if inspect:
                print("  host synchronisations and profiles", flush=True)
                (args.out / f"inspect_{name}.txt").write_text(inspect_watch(bench, Path(tmp), inspect))
            del bench
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(table)
    return 0


def render(results: dict[str, Any], card: str, rounds: int, steps: int, steady_steps: int, steady_after: int) -> str:
    """The table: per model the median and the mean step as ratios to the plain step, and the target if one is set."""
    names = list(results)
    lines = [f"Card: {card}; torch {torch.__version__}; {rounds} interleaved rounds × {steps} steps per variant "
             f"(CUDA events on a GPU); the default watch's row: {steady_steps} steps after its first {steady_after}, "
             "between two plain blocks. Ratios to the plain step of the same run: median / mean (the mean counts a "
             "schedule's sampled steps).", "",
             "| variant | " + " | ".join(f"{n} median | {n} mean" for n in names) + " | target |",
             "|---|" + "---:|---:|" * len(names) + "---:|",
             "| plain step (ms) | " + " | ".join(f"{results[n]['step_ms']:.1f} | " for n in names) + " |"]
    rows: list[str] = []
    for n in names:
        rows += [v for v in results[n]["ratio"] if v not in rows]
    for v in rows:
        cells = []
        for n in names:
            r = results[n]["ratio"].get(v)
            cells.append(f"{r['median']:.3f}× | {r['mean']:.3f}×" if r else "— | —")
        target = f"≤ {TARGETS[v]:.2f}×" if v in TARGETS else ""
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {target} |")
    lines.append("| floor: read every gradient once, share of the plain step | "
                 + " | ".join(f"{results[n]['floor_frac']:.1%} | " for n in names) + " |")
    for n in names:
        b = results[n].get("budget") or {}
        if b:
            lines.append("")
            lines.append(f"{n}, the default watch's own account (meta['budget']): overhead "
                         f"{b.get('overhead', float('nan')):.3%} of a {b.get('step_ms', float('nan')):.1f} ms step, "
                         f"kept: {b.get('kept')}; schedules: {results[n].get('schedules')}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
