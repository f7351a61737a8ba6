"""Mode coverage of the zoo GANs (8 Gaussians on a ring, 25 on a grid), after the VEEGAN paper's table.

    python benchmarks/gan_modes.py [--steps 300] [--seeds 5] [--doctor]
    ATEN_CPU_CAPABILITY=default python benchmarks/gan_modes.py --seeds 5 --doctor   # another CPU's rounding

2,500 samples per trained generator; a sample is high quality within 3σ of
its nearest mode, a mode is covered when it is the nearest mode of at least
one high-quality sample. Per seed: modes covered, the generator's total
gradient norm at the end over the start (median of the last 20 steps over the
first 10, from a naive loop over ``param.grad``), and for the ring the
diagnosis's problems. ``--doctor``: does gw.doctor repair the saturating
ring on that seed ("fixes it" with the non-saturating loss)?
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile

import numpy as np
import torch

import gradwatch as gw
from gradwatch import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--doctor", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, CPU kernels: "
          f"{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}; {args.steps} generator steps "
          f"(5 discriminator steps each), seeds 0–{args.seeds - 1}\n")
    print("| mixture | generator loss | per seed: modes covered · gradient end/start · problems"
          + (" · doctor" if args.doctor else "") + " |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as store:
        for kind in ("ring", "grid"):
            for nonsaturating, label in ((False, "saturating log(1 − D(G(z)))"), (True, "non-saturating −log D(G(z))")):
                cells = []
                for seed in range(args.seeds):
                    trial = zoo.gan_trial(seed, nonsaturating, kind)
                    norms = []
                    watch = gw.watch(trial.model, trial.optimizer, store=store, name=f"{kind}-{nonsaturating}-{seed}") \
                        if kind == "ring" else None
                    for _ in range(args.steps):
                        loss = trial.step()
                        norms.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in trial.model.parameters())))
                        if watch is not None:
                            watch.log(loss=loss)
                    m, _ = zoo.mode_metrics(
                        trial.model(torch.randn(2500, 2, generator=torch.Generator().manual_seed(123))).detach(),
                        trial.centers, trial.std)
                    ratio = float(np.median(norms[-20:]) / np.median(norms[:10]))
                    cell = f"{m:.0f}/{len(trial.centers)} · ×{ratio:.0e}"
                    if watch is not None:
                        watch.close()
                        cell += " · " + (", ".join(sorted({f.kind for f in watch.diagnose().problems})) or "none")
                        if args.doctor and not nonsaturating:
                            setup = zoo.get("gan_ring_saturating")
                            report = gw.doctor(lambda s, seed=seed: setup(seed + s), steps=args.steps, progress=False)
                            cell += " · " + (report.best.label if report.best else "not repaired")
                    cells.append(cell)
                print(f"| {kind} | {label} | {'; '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
