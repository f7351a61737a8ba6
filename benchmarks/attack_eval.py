"""Robust accuracy of the masked digits classifiers and their honest twin, under each attack of gw.check_attack.

    python benchmarks/attack_eval.py                  # seeds 0-2, L∞ ε = 0.1, with ART's Square attack
    ATEN_CPU_CAPABILITY=default python benchmarks/attack_eval.py

Writes a markdown table to stdout: per set-up and attack, the robust accuracy
on the 297 held-out digits for each seed, and the check's verdict.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import gradwatch as gw
from gradwatch import attack_zoo

SETUPS = ("digits_honest", "digits_rounding", "digits_temperature")
ATTACKS = ("FGSM (CE)", "PGD (CE)", "PGD (margin)", "PGD (CE, BPDA)", "random noise", "Square (black-box)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--no-square", action="store_true", help="leave out ART's Square attack (the slow one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'native')}; L∞ ε = {args.eps}, "
          f"seeds {args.seeds}\n")
    start = time.time()
    rows: dict[tuple[str, str], list[str]] = {}
    verdicts: dict[str, list[str]] = {}
    for name in SETUPS:
        for seed in args.seeds:
            s = attack_zoo.SETUPS[name](seed)
            r = gw.check_attack(s.model, s.x, s.y, eps=args.eps, clip=s.clip, square=not args.no_square, seed=seed)
            rows.setdefault((name, "clean"), []).append(f"{r.clean_accuracy:.2f}")
            for attack in ATTACKS:
                hit = [a for a in r.attacks if a.name == attack and a.eps == args.eps]
                rows.setdefault((name, attack), []).append(f"{hit[0].robust_accuracy:.2f}" if hit else "–")
            failed = sum(not c.passed for c in r.checks)
            verdicts.setdefault(name, []).append(
                f"{r.findings[0].severity}, {failed}/{len(r.checks)} checks failed" if r.findings else "no finding")
    print("| set-up | attack | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---:|" * len(args.seeds))
    for (name, attack), cells in rows.items():
        if any(c != "–" for c in cells):
            print(f"| {name} | {attack} | " + " | ".join(cells) + " |")
    print("\n| set-up | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for name, v in verdicts.items():
        print(f"| {name} | " + " | ".join(v) + " |")
    print(f"\n{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
