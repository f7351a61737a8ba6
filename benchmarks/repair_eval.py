"""The diagnosis and the doctor on set-ups the team did not write (benchmarks/setups/): detection and repair rates.

    python benchmarks/repair_eval.py [--seeds 0 1] [--only NAME …] [--no-doctor] [--json OUT] [--results RESULTS.md]
    ATEN_CPU_CAPABILITY=default python benchmarks/repair_eval.py --no-doctor   # another CPU's float rounding

Each set-up (ported from AUTOTRAINER, DeepDiagnosis, DeepLocalize's Stack
Overflow bugs and the papers; its label measured by plain hooks in
benchmarks/setups/truth.py) is trained for its own step count on each seed
under ``gw.watch`` with the watch's defaults, logging the loss, as a user
would, and diagnosed. Detection: a pathological set-up is found on a seed when
its label is among the kinds of ``Diagnosis.problems`` (critical or warning
findings); a healthy one is a false alarm when ``problems`` is non-empty. A
set-up labelled "fails" (it does not learn, with no gradient pathology past
the truth thresholds) is shown (✓ when anything is raised) but not counted.
Repair: ``gw.doctor`` on every pathological set-up (its steps, ``seeds`` =
the number of seeds given, which the doctor numbers from 0); repaired when the
doctor's best remedy has the verdict "fixes it". Where it finds no repair and
the set-up names its source's own fix (``BenchSetup.reference``: the
repository's repaired model, the paper's recipe), that fix is trained on the
same seeds and steps and judged by the doctor's test of real learning against
the same baseline: when it fails that test too, no remedy could have passed
it there, and the set-up is counted as out of reach. Prints a markdown table and
the rates; ``--json`` keeps every finding (kind, severity, remedy keys) and
every doctor trial (remedy, verdict, findings left); ``--results`` writes the
table into that markdown file, between markers of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.setups`, run from anywhere

import gradwatch as gw  # noqa: E402
from benchmarks import setups  # noqa: E402
from benchmarks.setups import truth  # noqa: E402
from gradwatch.doctor import trial_run, verdicts  # noqa: E402


def _finding(f: Any) -> dict[str, Any]:
    return {"kind": f.kind, "severity": f.severity, "layers": len(f.layers), "steps": list(f.steps),
            "summary": f.summary, "remedy_keys": list(f.remedy_keys)}


def detect(setup: setups.BenchSetup, seed: int, store: str) -> dict[str, Any]:
    """Train one seed under a watch (its defaults), diagnose; the findings and what they mean for the label."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    trial = setup(seed)
    losses: list[float] = []
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"{setup.name}-{seed}", overwrite=True) as w:
        for _ in range(setup.steps):
            loss = trial.step()
            w.log(loss=loss)
            losses.append(float(loss))
    diagnosis = w.diagnose()
    kinds = sorted({f.kind for f in diagnosis.problems})
    score = trial.evaluate(trial.model) if trial.evaluate is not None else math.nan
    return {"seed": seed, "kinds": kinds, "findings": [_finding(f) for f in diagnosis.findings],
            "ok": (not kinds) if setup.label == "healthy" else (bool(kinds) if setup.label == "fails" else setup.label in kinds),
            "first_loss": losses[0], "final_loss": losses[-1], "score": score,
            "seconds": time.perf_counter() - start}


def repair(setup: setups.BenchSetup, seeds: int, store: str) -> dict[str, Any]:
    """``gw.doctor`` on the set-up: its table, and whether the best remedy "fixes it"."""
    start = time.perf_counter()
    report = gw.doctor(setup.make, steps=setup.steps, seeds=seeds, store=store, progress=False)
    trials = [{"label": t.label, "parts": list(t.parts), "round": t.rounds, "verdict": t.verdict,
               "findings": list(t.findings), "first_loss": t.first_loss, "final_loss": t.final_loss,
               "score": t.score} for t in report.trials]
    held = bool(report.checks) and report.checks[-1].verdict == "fixes it"  # the best held on a seed no trial used
    return {"repaired": report.best is not None and report.best.verdict == "fixes it", "held": held,
            "checks": [{"label": c.label, "verdict": c.verdict, "final_loss": c.final_loss, "score": c.score}
                       for c in report.checks],
            "best": report.best.label if report.best else None, "message": report.message,
            "baseline_findings": [_finding(f) for f in report.diagnosis.findings],
            "baseline": {"first_loss": report.baseline.first_loss, "final_loss": report.baseline.final_loss,
                         "score": report.baseline.score},
            "trials": trials, "reference": reference(setup, seeds, store, report) if setup.reference else None,
            "seconds": time.perf_counter() - start}


def reference(setup: setups.BenchSetup, seeds: int, store: str, report: gw.DoctorReport) -> dict[str, Any] | None:
    """The source's own fix on the doctor's seeds and steps, judged by the doctor's test of real learning against
    the doctor's baseline (``verdicts.learns``); None where the doctor repaired the set-up (nothing to explain)."""
    if report.best is not None and report.best.verdict == "fixes it":
        return None
    assert setup.reference is not None
    start = time.perf_counter()
    runs = [trial_run.run_trial(setup.reference, seed, setup.steps, Path(store), f"{setup.name}-reference-{seed}",
                                None, {}) for seed in range(seeds)]
    row = verdicts.summary("the source's fix", [r for r in runs if r is not None], time.perf_counter() - start)
    return {"first_loss": row.first_loss, "final_loss": row.final_loss, "score": row.score,
            "learns": verdicts.learns(report.baseline, row)}


def _guard(fn: Any, *args: Any) -> dict[str, Any]:
    """Run one measurement; a crash inside gradwatch is a result (the error), not the end of the benchmark."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 — a benchmark of a library reports its failures
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4), "ok": False,
                "repaired": False, "kinds": []}


def _cell(d: dict[str, Any]) -> str:
    if "error" in d:
        return f"✗ error: {d['error'][:60]}"
    mark = "✓" if d["ok"] else "✗"
    said = ", ".join(f"{f['kind']} ({f['severity'][0]})" for f in d["findings"] if f["severity"] != "info") or "quiet"
    return f"{mark} {said}"


def _learns(doc: dict[str, Any]) -> bool:
    """Independent of the doctor's verdict: its best trial reaches truth.LEARNED_SCORE (or halves its loss, unscored)."""
    best = next((t for t in doc.get("trials", []) if t["label"] == doc.get("best")), None)
    if best is None:
        return False
    if math.isfinite(best["score"]):
        return best["score"] >= truth.LEARNED_SCORE
    return math.isfinite(best["final_loss"]) and best["final_loss"] <= truth.LEARNED_LOSS * best["first_loss"]


def _doctor_cell(doc: dict[str, Any]) -> str:
    if "error" in doc:
        return "✗ error: " + doc["error"][:60]
    if not doc["repaired"]:
        ref = doc.get("reference")
        if not ref:
            return "✗ " + doc["message"][:70]
        score = f", score {ref['score']:.2f}" if math.isfinite(ref["score"]) else ""
        said = "learns: a miss" if ref["learns"] else "does not pass either: out of reach"
        message = doc["message"].split(" (")[0][:40]
        return f"✗ {message}; the source's fix (loss {ref['first_loss']:.3g} → {ref['final_loss']:.3g}{score}) {said}"
    best = next(t for t in doc["trials"] if t["label"] == doc["best"])
    score = f"score {best['score']:.2f}" if math.isfinite(best["score"]) else f"loss {best['final_loss']:.3g}"
    held = "" if "held" not in doc else "; held on a fresh seed" if doc["held"] else "; NOT on a fresh seed"
    return f"{'✓' if _learns(doc) else '½'} {doc['best']} ({score}{held})"


def measure(names: list[str], seeds: list[int], doctor: bool) -> dict[str, dict[str, Any]]:
    """Detection runs (and the doctor) for every named set-up, printed as they finish."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as store:
        for name in names:
            setup = setups.get(name)
            entry: dict[str, Any] = {"label": setup.label, "source": setup.source, "steps": setup.steps,
                                     "runs": [_guard(detect, setup, seed, store) for seed in seeds]}
            if doctor and setup.label != "healthy":
                entry["doctor"] = _guard(repair, setup, len(seeds), store)
            out[name] = entry
            print(_row(name, entry, doctor), flush=True)
    return out


def _row(name: str, e: dict[str, Any], doctor: bool) -> str:
    row = f"| {name} | {e['label']} | {e['steps']} | " + " | ".join(_cell(r) for r in e["runs"])
    if doctor:
        row += " | " + (_doctor_cell(e["doctor"]) if "doctor" in e else "–")
    return row + " |"


def render(results: dict[str, Any]) -> list[str]:
    """The markdown table and the rates of a results dict (as measure() returns it, or read back from --json)."""
    entries, doctor = results["setups"], results["doctor"]
    n_seeds = max(len(e["runs"]) for e in entries.values())
    lines = [results["machine"], "", "| set-up | label | steps | " + " | ".join(f"seed {i}" for i in range(n_seeds))
             + (" | doctor" if doctor else "") + " |", "|---|---|---|" + "---|" * n_seeds + ("---|" if doctor else "")]
    lines += [_row(name, e, doctor) for name, e in entries.items()]
    counted = [(e["label"], r) for e in entries.values() if e["label"] != "fails" for r in e["runs"]]
    tp = sum(r["ok"] for lab, r in counted if lab != "healthy")
    fn = sum(not r["ok"] for lab, r in counted if lab != "healthy")
    fp = sum(not r["ok"] for lab, r in counted if lab == "healthy")
    healthy = sum(lab == "healthy" for lab, r in counted)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    summary = (f"detection over {tp + fn} pathological and {healthy} healthy runs: precision {precision:.2f}, recall "
               f"{recall:.2f} ({tp} found, {fn} missed, {fp} false alarm{'s' if fp != 1 else ''})")
    if doctor:
        sick = [e["doctor"] for e in entries.values() if e["label"] not in ("healthy", "fails")]
        fails = [e["doctor"] for e in entries.values() if e["label"] == "fails"]
        fixed = [d for d in sick if d.get("repaired")]
        real = [d for d in fixed if _learns(d)]
        summary += (f"; repair rate (the doctor's \"fixes it\") {len(fixed)}/{len(sick)} = {len(fixed) / max(len(sick), 1):.2f}"
                    f" of the pathological set-ups, {len(real)}/{len(sick)} = {len(real) / max(len(sick), 1):.2f} whose"
                    f" best remedy also reaches a score ≥ {truth.LEARNED_SCORE} (or halves an unscored loss)")
        out = [d for d in sick if not d.get("repaired") and d.get("reference") and not d["reference"]["learns"]]
        if out:
            reach = len(sick) - len(out)
            summary += (f"; {len(out)} of the {len(sick) - len(fixed)} not repaired are out of reach (their source's"
                        f" own fix fails the doctor's test of real learning on the same seeds and steps): "
                        f"{len(fixed)}/{reach} = {len(fixed) / max(reach, 1):.2f} of those within reach")
        if any("held" in d for d in fixed):
            held = sum(bool(d.get("held")) for d in fixed)
            summary += f"; {held}/{len(fixed)} of the repaired held on a seed no trial used (the doctor's seed check)"
        if fails:
            summary += f"; {sum(bool(d.get('repaired')) for d in fails)}/{len(fails)} of those labelled 'fails'"
    return lines + ["", summary]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=None, help="these set-ups only")
    parser.add_argument("--no-doctor", action="store_true", help="detection only")
    parser.add_argument("--json", type=Path, default=None, help="write every finding and doctor trial here")
    parser.add_argument("--from-json", type=Path, default=None, help="render a saved --json instead of measuring")
    parser.add_argument("--results", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        torch.set_num_threads(1)
        kernels = os.environ.get("ATEN_CPU_CAPABILITY", "native")
        head = (f"machine: {os.cpu_count()}-core {platform.machine()}, torch {torch.__version__}, CPU kernels: "
                f"{kernels}; seeds {args.seeds}; "
                + ("detection only" if args.no_doctor else f"doctor with seeds={len(args.seeds)}"))
        print(head + "\n", flush=True)
        results = {"machine": head, "kernels": kernels, "doctor": not args.no_doctor,
                   "setups": measure(args.only or setups.names(), args.seeds, not args.no_doctor)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    lines = render(results)
    print("\n" + "\n".join(lines))
    if args.results:
        _write_results(args.results, f"{results['kernels']}{'' if results['doctor'] else '-detection'}", "\n".join(lines))


def _write_results(path: Path, key: str, table: str) -> None:
    """Replace (or append) the block between this key's markers in a markdown file."""
    begin, end = f"<!-- repair_eval {key} begin -->", f"<!-- repair_eval {key} end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{table}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n")


if __name__ == "__main__":
    main()
