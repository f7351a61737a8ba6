"""Every zoo set-up: is the right pathology found (and nothing on healthy ones), and does the doctor repair it?

    python benchmarks/zoo_eval.py [--steps 300]

Detection: a pathological set-up is found when a finding of its expected kind
appears; a healthy one is a false alarm when any finding appears. Repair: the
doctor's best remedy "fixes it" (its own trial has the findings gone and a
better held-out score or final loss). Prints a markdown table, precision and
recall of detection and the repair rate.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

import gradwatch as gw
from gradwatch import zoo
from gradwatch.diagnosis.findings import span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU; "
          f"{args.steps} steps per run, seed 0\n")
    print("| set-up | expected | found (layers) | detection | doctor: best remedy | score before → after | time |")
    print("|---|---|---|---|---|---|---:|")
    tp = fp = fn = repaired = sick = 0
    with tempfile.TemporaryDirectory() as store:
        for name, setup in zoo.SETUPS.items():
            start = time.perf_counter()
            trial = setup(0)
            temporal = any(isinstance(m, torch.nn.RNNBase) for m in trial.model.modules())
            with gw.watch(trial.model, trial.optimizer, store=store, name=name, temporal=temporal) as w:
                for _ in range(args.steps):
                    w.log(loss=trial.step())
            diagnosis = w.diagnose()
            found = "; ".join(f"{f.kind} ({span(f.layers) if f.layers else 'all'})" for f in diagnosis) or "—"
            doctor_text, scores = "", ""
            if setup.expect is None:
                ok = not diagnosis.findings
                fp += not ok
                verdict = "✓ quiet" if ok else "✗ false alarm"
            else:
                sick += 1
                ok = setup.expect in diagnosis.kinds
                tp += ok
                fn += not ok
                fp += bool(diagnosis.findings) and not ok
                verdict = "✓" if ok else "✗ missed"
                report = gw.doctor(setup, steps=args.steps, progress=False)
                if report.best is not None:
                    repaired += 1
                    doctor_text = report.best.label
                    scores = f"{report.baseline.score:.2f} → {report.best.score:.2f}"
                else:
                    doctor_text = report.message
                    scores = f"{report.baseline.score:.2f}"
            print(f"| {name} | {setup.expect or 'healthy'} | {found} | {verdict} | {doctor_text} | {scores} | "
                  f"{time.perf_counter() - start:.0f} s |", flush=True)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    print(f"\ndetection: precision {precision:.2f}, recall {recall:.2f} "
          f"({tp} of {sick} pathologies found, {fp} false alarm{'s' if fp != 1 else ''}); "
          f"repair rate {repaired}/{sick} = {repaired / sick:.2f}")


if __name__ == "__main__":
    main()
