"""The doctor's table: one row per remedy tried (or the baseline), and the report that prints them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gradwatch._errors import bad_argument
from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.findings import Finding
from gradwatch.doctor.knobs import weight
from gradwatch.doctor.locate import Origin
from gradwatch.doctor.surgery import PreciseBN

MAX_ROUNDS = 3  # iterative repair: at most this many remedies combined


@dataclass
class TrialResult:
    """One remedy (or the baseline), averaged over seeds."""

    label: str
    final_loss: float
    auc: float
    score: float  # held-out score (higher is better), NaN when the setup has none
    findings: list[str]  # finding kinds left after the fix (union over seeds)
    seconds: float
    verdict: str = ""
    first_loss: float = math.nan  # the run's first finite loss (mean over seeds; inf when none was finite)
    learned: bool = False  # every seed's final loss is at most half its own first finite loss
    critical: list[str] = field(default_factory=list)  # kinds of its critical findings (union over seeds)
    problems: tuple[Finding, ...] = ()  # its problem findings, the first of each kind over seeds (what to try next)
    null_loss: float = math.nan  # the loss of a constant output (mean over seeds): a fix ends clearly below it
    judge_by_score: bool = False  # the set-up's loss does not show learning: the held-out score decides
    null_score: float = math.nan  # the held-out score of a constant output (mean over seeds): a fix ends above it
    rounds: int = 1  # remedies combined (iterative repair: at most 3)
    parts: tuple[str, ...] = ()  # the catalogue keys of the remedies in it
    runs: tuple[str, ...] = ()  # its run stores' names under the doctor's store, one per seed
    error: str = ""  # why a trial of it failed (it raised, or its worker died); "" when none did
    rescored_bn: bool = False  # its score was read after re-estimating the BatchNorm statistics it inserted
    changed: str = ""  # what its change did, where the change says (where the skip connections went)
    own_objective: bool = False  # its loss weighs the samples otherwise (pos_weight): not comparable to the baseline's
    # the change it tried (its catalogue entry, gradwatch.doctor.catalogue.Remedy); None for the baseline's row
    remedy: Any = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        """The row in words: ``residual connections (x + f(x) around 6 blocks: …): fixes it — final loss 0.31 from
        a first loss of 2.3, score 0.962; findings left: none``."""
        where = f" ({self.changed})" if self.changed else ""
        if self.error:
            return f"{_name(self)}{where}: failed — {self.error}"
        score = f", score {_score(self.score)}" if math.isfinite(self.score) else ""
        began = (f"from a first loss of {self.first_loss:.4g}" if self.first_loss != math.inf
                 else "with no finite loss on any step")
        return (f"{_name(self)}{where}: {self.verdict or 'not judged'} — final loss {loss_text(self.final_loss)} {began}"
                f"{score}; findings left: {', '.join(self.findings) or 'none'}")

    @classmethod
    def failed(cls, label: str, error: str, seconds: float = math.nan) -> TrialResult:
        """A row for a remedy (or the baseline) whose trial failed: nothing measured, the error as its verdict."""
        return cls(label, math.nan, math.nan, math.nan, [], seconds, verdict=f"failed: {error}", error=error)


@dataclass
class DoctorReport:
    """The doctor's table; ``best`` is the remedy it recommends, with its evidence (None: nothing to recommend)."""

    baseline: TrialResult
    diagnosis: Diagnosis
    trials: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    message: str = ""
    steps: int = 0
    seeds: int = 1
    # where nothing fixed a run that goes non-finite: the operation and line that made its first NaN/Inf
    nonfinite_origin: Origin | None = None
    # the best "fixes it" rows run again on a seed no trial used (gw.doctor's check_seed), in the order run
    checks: list[TrialResult] = field(default_factory=list)
    # the remedies of round 1 that the findings named but that found nothing to change here (their apply gave None)
    not_applied: list[str] = field(default_factory=list)
    # what the findings measured that the remedies read (a clipping bound, a learning rate's factor)
    numbers: dict[str, float] = field(default_factory=dict, repr=False)

    def apply(self, trial: Any, row: TrialResult | None = None) -> Any:
        """``trial`` (a fresh one of the set-up's, ``setup(seed)``) with the change of ``row`` — by default
        :attr:`best` — made as the doctor made it in its trials: train it on, keep its model. Trained for
        :attr:`steps` steps on the seed of a row's trial, it gives that trial's numbers."""
        row = self.best if row is None else row
        if row is None or row.remedy is None:
            raise ValueError(bad_argument("DoctorReport.apply", "row", "a row of this report's trials or checks "
                                          "(the report recommends none: pass one)" if row is None else
                                          "a row of this report's trials or checks, not the baseline's", row))
        changed = row.remedy.apply(trial, {**self.numbers, "doctor_steps": float(self.steps)})
        if changed is None:
            raise ValueError(bad_argument("DoctorReport.apply", "trial", f"a trial of the set-up the doctor ran: "
                                          f"{row.label} finds nothing to change in this one", trial))
        return changed

    def __str__(self) -> str:
        head = f"gw.doctor — {self.steps} steps × {self.seeds} seed{'s' if self.seeds > 1 else ''}: {self.message}"
        lines = [head, ""]
        rows = [self.baseline] + self.trials
        has_score = any(math.isfinite(r.score) for r in rows)
        left = [", ".join(r.findings) or "none" for r in rows]
        nw = max(len("remedy"), *(len(_name(r)) for r in rows))  # as wide as the longest: a bound or factor is never cut
        fw = max(len("findings left"), *(len(f) for f in left))
        lines.append(f"{'remedy':<{nw}} {'round':>5} {'first loss':>11} {'final loss':>10} {'AUC':>10}"
                     + (f" {'score':>7}" if has_score else "") + f" {'findings left':<{fw}} {'time':>6}  verdict")
        for r, f in zip(rows, left):
            lines.append(f"{_name(r):<{nw}} {r.rounds if r is not self.baseline else '-':>5} {_first(r):>11} "
                         f"{loss_text(r.final_loss):>10} {loss_text(r.auc):>10}"
                         + (f" {_score(r.score):>7}" if has_score else "")
                         + f" {f:<{fw}} {r.seconds:>5.1f}s  {r.verdict}")
        if any(r.rounds > 1 for r in self.trials):
            lines.append("")
            lines.append(f"round n: n remedies combined (iterative repair, at most {MAX_ROUNDS} rounds), named by their "
                         f"catalogue keys")
        rescored = [_name(r) for r in rows if r.rescored_bn and math.isfinite(r.score)]
        if rescored:
            lines.append("")
            lines.append(f"scored after re-estimating the running statistics of the BatchNorm layers inserted, over "
                         f"{PreciseBN.BATCHES} training batches (PreciseBN; a short trial leaves them trailing the weights): "
                         f"{'; '.join(rescored)}")
        changed = [f"{_name(r)}: {r.changed}" for r in rows if r.changed]
        if changed:
            lines.append("")
            lines.append("what the changes did: " + "; ".join(changed))
        same = same_runs(rows)
        if same:
            lines.append("")
            for later, earlier in same:
                if earlier is not self.baseline and weight(later.parts) < weight(earlier.parts):
                    later, earlier = earlier, later  # the row that adds something is the one whose addition never acted
                lines.append(f"{_name(later)}: trained exactly as {_name(earlier)} (every number equal): "
                             + ("the remedy changed nothing here" if earlier is self.baseline
                                else "what it adds never acted on these steps"))
        if self.checks:
            lines.append("")
            lines.append("seed check (a seed none of the rows above used):")
            for c in self.checks:
                lines.append(f"  {c.label}: final loss {loss_text(c.final_loss)}"
                             + (f", score {c.score:.3f}" if math.isfinite(c.score) else "") + f" — {c.verdict}")
            unchecked = self.unchecked_fixes()
            if unchecked:
                # round 36: a "fixes it" row at 0.76 on seed 0 (the best, checked, at 0.99) diverged on seed 1
                others = ("the other row that fixes it was" if len(unchecked) == 1
                          else f"the other {len(unchecked)} rows that fix it were")
                lines.append(f"  {others} judged on the trials' seed{'s' * (self.seeds != 1)} alone: check one on "
                             f"another seed before you adopt it")
        return "\n".join(lines)

    def unchecked_fixes(self) -> list[TrialResult]:
        """The rows whose verdict is "fixes it" that no seed check ran again."""
        checked = {c.parts for c in self.checks}
        return [t for t in self.trials if t.verdict == "fixes it" and t.parts not in checked]


    def _repr_html_(self) -> str:
        """In a notebook: the doctor's message, its table, then the baseline's findings."""
        import html

        e = html.escape
        rows = [self.baseline] + self.trials
        has_score = any(math.isfinite(r.score) for r in rows)
        head = ("<tr><th>remedy</th><th>round</th><th>first loss</th><th>final loss</th><th>AUC</th>"
                + ("<th>score</th>" if has_score else "") + "<th>findings left</th><th>time</th><th>verdict</th></tr>")
        body = "".join(
            f"<tr><td>{e(r.label)}</td><td>{r.rounds if r is not self.baseline else '-'}</td><td>{_first(r)}</td>"
            f"<td>{loss_text(r.final_loss)}</td><td>{loss_text(r.auc)}</td>" + (f"<td>{r.score:.3f}</td>" if has_score else "")
            + f"<td>{e(', '.join(r.findings) or 'none')}</td><td>{r.seconds:.1f}s</td><td>{e(r.verdict)}</td></tr>"
            for r in rows)
        checks = "".join(f"<li>{e(c.label)}: final loss {loss_text(c.final_loss)} — {e(c.verdict)}</li>" for c in self.checks)
        checks = f"<p>seed check (a seed none of the rows used):</p><ul>{checks}</ul>" if checks else ""
        same = "".join(f"<li>{e(_name(a))}: trained exactly as {e(_name(b))}</li>" for a, b in same_runs(rows))
        checks = (f"<ul>{same}</ul>" if same else "") + checks
        changed = "".join(f"<li>{e(_name(r))}: {e(r.changed)}</li>" for r in rows if r.changed)
        checks = (f"<p>what the changes did:</p><ul>{changed}</ul>" if changed else "") + checks
        return (f"<div><h3>gw.doctor — {self.steps} steps × {self.seeds} seed{'s' if self.seeds > 1 else ''}: "
                f"{e(self.message)}</h3><table>{head}{body}</table>{checks}{self.diagnosis._repr_html_()}</div>")


def _name(row: TrialResult) -> str:
    """A row's name in the table: its label, or for a combination its catalogue keys."""
    return row.label if row.rounds == 1 or not row.parts else " + ".join(row.parts)


def same_runs(rows: list[TrialResult]) -> list[tuple[TrialResult, TrialResult]]:
    """Each row that trained exactly as an earlier one — the same first and final loss, AUC and score, to the last
    bit, and a finite final loss — paired with the first such row: a combination whose clipping never engaged, a
    remedy that found nothing to change on these steps."""
    seen: dict[tuple[float, ...], TrialResult] = {}
    same: list[tuple[TrialResult, TrialResult]] = []
    for row in rows:
        if row.error or not math.isfinite(row.final_loss):
            continue
        key = (row.first_loss, row.final_loss, row.auc, -1.0 if math.isnan(row.score) else row.score)
        if key in seen:
            same.append((row, seen[key]))
        else:
            seen[key] = row
    return same


def loss_text(loss: float) -> str:
    """A final loss or AUC in words: "not finite" where a step of it was NaN or ±inf (stored as inf), else 4 digits."""
    return "not finite" if loss == math.inf else f"{loss:.4g}"


def _first(row: TrialResult) -> str:
    """A row's first loss for the table: "none finite" where no step's loss was finite (stored as inf)."""
    return "none finite" if row.first_loss == math.inf else f"{row.first_loss:.4g}"


def _score(score: float) -> str:
    """A held-out score for the table's 7 columns: 3 decimals, or 3 significant digits where it is far from 0–1 (an R²
    of −1.7e20 for a diverged regression)."""
    return f"{score:.3f}" if not math.isfinite(score) or abs(score) < 100 else f"{score:.3g}"


DECISIVE_BELOW = 0.5  # a fix that ends above this fraction of the null loss is marginal: the doctor looks on


def decisive(row: TrialResult) -> bool:
    """A "fixes it" that ends the search: its final loss is at most half a constant output's (``null_loss``), or the
    set-up gives no null loss or is judged by its score. A marginal fix (an adding-problem net at R² 0.13) is kept
    in the table and the doctor goes on combining remedies, to find a better one within its rounds."""
    if row.verdict != "fixes it":
        return False
    return row.judge_by_score or not row.null_loss > 0 or row.final_loss <= DECISIVE_BELOW * row.null_loss
