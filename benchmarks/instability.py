"""Small-scale proxy for Transformer training instabilities (Wortsman et al. 2023, Fig. 1), on one CPU thread.

    nice -n 10 python benchmarks/instability.py            # 8 learning rates × 4 variants, seed 0 (~35 min)
    nice -n 10 python benchmarks/instability.py --seeds 1 2 --lrs 0.03 0.1 0.3 --variants plain qk-norm
    python benchmarks/instability.py --plot-only            # table and plot from benchmarks/instability.json
    python benchmarks/instability.py --smoke                # the script end to end in seconds

A 4-layer, width-128 decoder-only Transformer (gradwatch.tinylm.TinyLM) on
a synthetic language with structure (a sparse Markov chain, then an
in-context copy of an earlier span), trained with AdamW (β = 0.9, 0.95,
decoupled weight decay 1e-4 independent of the learning rate, linear warm-up
then cosine decay: Wortsman's recipe) at learning rates 1e-4 … 3e-1, in four
variants: plain; qk-layernorm; z-loss 1e-4·log²Z; both. Each run is watched
(gw.watch: loss, per-layer gradient norms, update ratios every step); the
attention probe measures every 10th step and the series go to
instability_findings() directly (the watch does not record attention
statistics yet). Writes benchmarks/instability.json (one entry per run, added
as runs finish), benchmarks/instability.png and the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnosis.instability import ProbeSeries, instability_findings
from gradwatch.probes.attention import AttentionProbe
from gradwatch.remedies.transformer import add_qk_norm, z_loss
from gradwatch.tinylm import MarkovCopyLanguage, TinyLM

HERE = Path(__file__).resolve().parent
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
VARIANTS = {"plain": (False, False), "qk-norm": (True, False), "z-loss": (False, True), "qk-norm + z-loss": (True, True)}
CFG = dict(vocab=64, width=128, depth=4, heads=4, seq_len=64, batch=16, steps=300, warmup=30, probe_every=10)
SMOKE = dict(CFG, width=32, depth=2, heads=2, batch=4, steps=12, warmup=2, probe_every=3)


def schedule(step: int, cfg: dict) -> float:
    """Linear warm-up to 1, then cosine decay to 0 (a multiplier of the peak learning rate)."""
    if step < cfg["warmup"]:
        return (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return 0.5 * (1 + math.cos(math.pi * t))


def run(variant: str, lr: float, seed: int, cfg: dict, store: Path) -> dict:
    """Train one model; returns its final held-out loss, attention statistics and findings."""
    qk, zl = VARIANTS[variant]
    torch.manual_seed(seed)
    lang = MarkovCopyLanguage(cfg["vocab"], cfg["seq_len"], seed=0)  # the same language for every run
    model = TinyLM(cfg["vocab"], cfg["width"], cfg["depth"], cfg["heads"], cfg["seq_len"])
    if qk:
        add_qk_norm(model, inplace=True)
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    # Wortsman et al.: decoupled weight decay 1e-4 independent of the learning rate (AdamW multiplies it by lr)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4 / lr}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, cfg))
    probe = AttentionProbe(model).attach(armed=False)
    g = torch.Generator().manual_seed(seed)
    collected: dict[int, dict] = {}
    losses: list[float] = []
    t0 = time.perf_counter()
    name = f"{variant.replace(' ', '').replace('+', '_')}-lr{lr:g}-s{seed}"
    with gw.watch(model, opt, activations=False, update_every=1, store=store, name=name, overwrite=True) as watch:
        for step in range(cfg["steps"]):
            probe.armed = step % cfg["probe_every"] == 0 or step == cfg["steps"] - 1
            x, y = lang.batch(cfg["batch"], g)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            total = loss + z_loss(logits) if zl else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            watch.log(loss=loss.detach())
            if probe.armed:
                collected[step] = {k: float(v) for k, v in probe.collect().items()}
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break  # nothing is learnt after NaN; the store keeps the steps up to it
    probe.detach()
    seconds = time.perf_counter() - t0
    (watch.path / "probes.json").write_text(json.dumps({s: [[*k, v] for k, v in c.items()] for s, c in collected.items()}))
    findings = diagnose(watch.path)
    held = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        evals = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in (lang.batch(32, held) for _ in range(4))]
    final = float(torch.stack(evals).mean())
    maxlog = [max((v for (_, q, _), v in s.items() if q == "attn_logit_max"), default=math.nan) for s in collected.values()]
    ent = [min((v for (_, q, _), v in s.items() if q == "attn_entropy"), default=math.nan) for s in collected.values()]
    logz = [max((abs(v) for (_, q, _), v in s.items() if q == "logz_mean"), default=math.nan) for s in collected.values()]
    return {
        "variant": variant, "lr": lr, "seed": seed, "steps": len(losses), "seconds": seconds,
        "final_loss": final if math.isfinite(final) else None,
        "best_train_loss": min((l for l in losses if math.isfinite(l)), default=None),
        "probe_steps": sorted(collected), "max_logit": maxlog, "min_entropy": ent, "abs_logz": logz,
        "findings": findings, "loss_floor": lang.loss_floor(), "run": str(watch.path),
    }


def diagnose(path: Path) -> list[dict]:
    """instability_findings() of a stored run, with the attention series the benchmark kept beside it (probes.json)."""
    raw = json.loads((Path(path) / "probes.json").read_text())
    collected = {int(s): {(l, q, h): v for l, q, h, v in rows} for s, rows in raw.items()}
    with gw.open_run(path) as stored:
        findings = instability_findings(stored, probes=ProbeSeries.from_collected(collected))
    return [{"severity": f.severity, "summary": f.summary, "remedies": list(f.remedy_keys),
             "attention_logit_growth": "attention_logit_growth" in f.numbers,
             "output_logit_divergence": "output_logit_divergence" in f.numbers, "text": str(f)} for f in findings]


def _finite_max(xs: list) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return max(xs) if xs else math.nan


def table(results: list[dict]) -> str:
    """Markdown: final held-out loss (and max attention logit over training) per lr and variant; the findings."""
    lrs = sorted({r["lr"] for r in results})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    seeds = sorted({r["seed"] for r in results})
    lines = []
    for seed in seeds:
        lines.append(f"seed {seed}: final held-out loss / max attention logit over training / finding "
                     f"(A: attention-logit growth named, Z: output-logit divergence named, -: a finding without either, "
                     f"blank: no finding)\n")
        lines.append("| lr | " + " | ".join(variants) + " |")
        lines.append("|---|" + "---|" * len(variants))
        for lr in lrs:
            cells = []
            for v in variants:
                r = next((r for r in results if r["variant"] == v and r["lr"] == lr and r["seed"] == seed), None)
                if r is None:
                    cells.append("")
                    continue
                loss = "NaN" if r["final_loss"] is None else f"{r['final_loss']:.2f}"
                tag = "".join(("A" if f["attention_logit_growth"] else "") + ("Z" if f["output_logit_divergence"] else "")
                              or "-" for f in r["findings"] if f["severity"] != "info")
                cells.append(f"{loss} / {_finite_max(r['max_logit']):.3g} / {tag}")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        for seed in sorted({r["seed"] for r in results}):
            rs = sorted((r for r in results if r["variant"] == v and r["seed"] == seed), key=lambda r: r["lr"])
            if not rs:
                continue
            lrs = [r["lr"] for r in rs]
            loss = [r["final_loss"] if r["final_loss"] is not None else math.nan for r in rs]
            label = v if seed == 0 else None
            style = dict(marker="o", ls="-" if "qk" in v else "--", alpha=1.0 if seed == 0 else 0.4)
            line = axes[0].plot(lrs, loss, label=label, **style)[0]
            axes[1].plot(lrs, [_finite_max(r["max_logit"]) for r in rs], color=line.get_color(), label=label, **style)
    floor = results[0]["loss_floor"]
    axes[0].axhline(floor, color="grey", lw=0.8, ls=":", label=f"loss floor ≈ {floor:.2f}")
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="final held-out loss", title="final loss (Wortsman Fig. 1 shape)")
    axes[0].set_ylim(top=min(5.0, axes[0].get_ylim()[1]))
    axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="max attention logit over training",
                title="attention-logit growth")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="*", default=list(LRS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--store", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--rediagnose", action="store_true", help="recompute the findings of the kept runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(SMOKE if args.smoke else CFG)
    if args.steps:
        cfg["steps"] = args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("instability_smoke.json" if args.smoke else "instability.json")
    results = json.loads(out.read_text()) if out.exists() and not args.smoke else []
    if args.rediagnose:
        for r in results:
            r["findings"] = diagnose(Path(r["run"]))
        out.write_text(json.dumps(results, indent=1))
    elif not args.plot_only:
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store or Path(tmp)
            for seed in args.seeds:
                for lr in args.lrs:
                    for v in args.variants:
                        r = run(v, lr, seed, cfg, store)
                        results = [x for x in results if (x["variant"], x["lr"], x["seed"]) != (v, lr, seed)] + [r]
                        out.write_text(json.dumps(results, indent=1))
                        print(f"{v:>16} lr {lr:<7g} seed {seed}: final {r['final_loss']}, max logit "
                              f"{_finite_max(r['max_logit']):.3g}, {r['seconds']:.0f} s, "
                              f"{[f['summary'] for f in r['findings']]}", file=sys.stderr, flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"niceness {os.nice(0)}; config {cfg}\n")
    print(table(results))
    plot(results, args.out / ("instability_smoke.png" if args.smoke else "instability.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
