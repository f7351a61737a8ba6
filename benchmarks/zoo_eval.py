"""Every zoo set-up: is the right pathology found (and nothing on healthy ones), and does the doctor repair it?

    python benchmarks/zoo_eval.py [--steps N] [--seeds 0 1 2] [--no-doctor]
    ATEN_CPU_CAPABILITY=default python benchmarks/zoo_eval.py --seeds 0 1 2 --no-doctor   # another CPU's rounding

Detection: a pathological set-up is found on a seed when a problem (critical
or warning) of its expected kind appears; a healthy one is a false alarm when
any problem appears, and it must learn (held-out score). Repair: the doctor's
best remedy "fixes it" on the seed (its verdict: the findings gone, no new
critical one, real learning; gradwatch.doctor.verdicts), and, independently of
that verdict, whether the best remedy's held-out score reaches 0.8 ("really
learns", the yardstick of benchmarks/repair_eval.py). Prints a markdown table,
one row per set-up with one cell per seed, then precision and recall of
detection and both repair rates over all (set-up, seed) pairs. Detection
trains every set-up ``--steps`` steps (default 300); the doctor trains each
trial that long too where given, else as long as the set-up says its trials
need (``Setup.steps``: the long adding tasks), else 300.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

import gradwatch as gw
from gradwatch import zoo

DETECT_STEPS = 300
LEARNED_SCORE = 0.8  # "really learns", as benchmarks/setups/truth.py judges the ported set-ups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 300; the doctor: the set-up's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-doctor", action="store_true", help="detection only")
    parser.add_argument("--only", nargs="+", default=None, help="these set-ups only")
    args = parser.parse_args()
    kernels = os.environ.get("ATEN_CPU_CAPABILITY", "native")
    print(f"machine: {platform.machine()} ({platform.processor() or 'cpu'}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU kernels: {kernels}; {args.steps or DETECT_STEPS} steps per detection run, "
          f"the doctor's: {args.steps or 'as each set-up says (else 300)'}; seeds {args.seeds}\n")
    print("| set-up | expected | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    tp = fp = fn = repaired = real = sick = healthy_runs = 0
    with tempfile.TemporaryDirectory() as store:
        for name in args.only or zoo.names():
            setup = zoo.get(name)
            cells = []
            for seed in args.seeds:
                start = time.perf_counter()
                path, trial = zoo.train_watched(name, seed, args.steps or DETECT_STEPS, store, run_name=f"{name}-{seed}")
                problems = gw.diagnose(path).problems
                kinds = sorted({f.kind for f in problems})
                score = trial.evaluate(trial.model) if trial.evaluate else float("nan")
                if setup.expect is None:
                    healthy_runs += 1
                    fp += bool(problems)
                    cell = ("✓ quiet" if not problems else "✗ " + ", ".join(kinds)) + f", score {score:.2f}"
                else:
                    sick += 1
                    ok = setup.expect in kinds
                    tp += ok
                    fn += not ok
                    cell = ("✓ " if ok else "✗ missed: ") + (", ".join(kinds) or "nothing")
                    if not args.no_doctor:
                        steps = args.steps or setup.steps  # None: the doctor's default
                        report = gw.doctor(lambda s, seed=seed: setup(seed + s), steps=steps, progress=False)
                        best = report.best
                        fixed = best is not None and best.verdict == "fixes it"
                        learns = fixed and best.score >= LEARNED_SCORE  # type: ignore[union-attr]
                        repaired += fixed
                        real += learns
                        held = bool(report.checks) and report.checks[-1].verdict == "fixes it"  # on the next seed
                        cell += (f"; doctor: {'✓' if learns else '½'} {best.label} (score {best.score:.2f}"  # type: ignore[union-attr]
                                 f"{'' if held else '; not on the next seed'})"
                                 if fixed else f"; doctor: ✗ {report.message[:60]}") + f" [{report.steps} steps]"
                cells.append(f"{cell} ({time.perf_counter() - start:.0f} s)")
            print(f"| {name} | {setup.expect or 'healthy'} | " + " | ".join(cells) + " |", flush=True)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    print(f"\ndetection over {sick} pathological and {healthy_runs} healthy runs: precision {precision:.2f}, "
          f"recall {recall:.2f} ({tp} found, {fn} missed, {fp} false alarm{'s' if fp != 1 else ''})"
          + ("" if args.no_doctor else f"; repair rate (the doctor's \"fixes it\") {repaired}/{sick} = {repaired / sick:.2f}, "
             f"{real}/{sick} = {real / sick:.2f} whose best remedy also reaches a score ≥ {LEARNED_SCORE}"))


if __name__ == "__main__":
    main()
