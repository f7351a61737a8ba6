"""Small-scale proxy for Transformer training instabilities (Wortsman et al. 2023, Fig. 1), on one CPU thread.

    nice -n 10 python benchmarks/instability.py            # 8 learning rates × 4 variants, seed 0 (~40 min)
    nice -n 10 python benchmarks/instability.py --seeds 1 2 --lrs 0.03 0.1 0.3 --variants plain qk-norm
    python benchmarks/instability.py --plot-only            # table and plot from benchmarks/instability.json
    python benchmarks/instability.py --smoke                # the script end to end in seconds

A 4-layer, width-128, 4-head decoder-only Transformer (gradwatch.tinylm.TinyLM)
on a synthetic language with structure (64 tokens: a sparse Markov chain, a
separator, then an in-context copy of an earlier span), 300 steps of 8
sequences, trained by gradwatch.tinylm.train_proxy: AdamW (β = 0.9, 0.95,
decoupled weight decay 1e-4 independent of the learning rate, linear warm-up
over 30 steps then cosine decay: Wortsman's recipe, shortened) at learning
rates 1e-4 … 3e-1, in four variants: plain; qk-layernorm; z-loss 1e-4·log²Z;
both. Each run is watched (gw.watch: loss, per-layer gradient norms, update
ratios every step); the attention probe measures every 10th step and its
series go to instability_findings() directly, kept beside the run as
probes.json (the watch does not record attention statistics yet). Writes benchmarks/instability.json (one entry per run, added
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
from pathlib import Path

import torch

import gradwatch as gw
from gradwatch.diagnosis.instability import ProbeSeries, instability_findings
from gradwatch.tinylm import MarkovCopyLanguage, train_proxy

HERE = Path(__file__).resolve().parent
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
VARIANTS = {"plain": (False, False), "qk-norm": (True, False), "z-loss": (False, True), "qk-norm + z-loss": (True, True)}
CFG = dict(vocab=64, width=128, depth=4, heads=4, seq_len=64, batch=8, steps=300, warmup=30, probe_every=10)
SMOKE = dict(CFG, width=32, depth=2, heads=2, batch=4, steps=12, warmup=2, probe_every=3)


def run(variant: str, lr: float, seed: int, cfg: dict, store: Path) -> dict:
    """Train one model (gradwatch.tinylm.train_proxy); its final held-out loss, attention statistics and findings."""
    qk, zl = VARIANTS[variant]
    r = train_proxy(lr, seed, qk_norm=qk, z_loss_coef=1e-4 if zl else 0.0, store=store,
                    name=f"{variant.replace(' ', '').replace('+', '_')}-lr{lr:g}-s{seed}", **cfg)
    (r.path / "probes.json").write_text(json.dumps({s: [[*k, v] for k, v in c.items()] for s, c in r.probes.items()}))
    samples = [r.probes[s] for s in sorted(r.probes)]
    maxlog = [max((v for (_, q, _), v in c.items() if q == "attn_logit_max"), default=math.nan) for c in samples]
    ent = [min((v for (_, q, _), v in c.items() if q == "attn_entropy"), default=math.nan) for c in samples]
    logz = [max((abs(v) for (_, q, _), v in c.items() if q == "logz_mean"), default=math.nan) for c in samples]
    finite = [x for x in r.losses if math.isfinite(x)]
    return {
        "variant": variant, "lr": lr, "seed": seed, "steps": len(r.losses), "seconds": r.seconds,
        "final_loss": r.final_loss if math.isfinite(r.final_loss) else None,
        "best_train_loss": min(finite) if finite else None,
        "probe_steps": sorted(r.probes), "max_logit": maxlog, "min_entropy": ent, "abs_logz": logz,
        "findings": diagnose(r.path), "run": str(r.path),
        "loss_floor": MarkovCopyLanguage(cfg["vocab"], cfg["seq_len"], markov=cfg["seq_len"] * 5 // 8).loss_floor(),
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
        ran = [v for v in variants if any(r["variant"] == v and r["seed"] == seed for r in results)]
        lines.append("| lr | " + " | ".join(ran) + " |")
        lines.append("|---|" + "---|" * len(ran))
        for lr in lrs:
            cells = []
            for v in ran:
                r = next((r for r in results if r["variant"] == v and r["lr"] == lr and r["seed"] == seed), None)
                if r is None:
                    cells.append("")
                    continue
                loss = "NaN" if r["final_loss"] is None else f"{r['final_loss']:.2f}"
                tag = "".join(("A" if f["attention_logit_growth"] else "") + ("Z" if f["output_logit_divergence"] else "")
                              or "-" for f in r["findings"] if f["severity"] != "info")
                cells.append(f"{loss} / {_finite_max(r['max_logit']):.3g} / {tag}")
            if any(cells):
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
