"""Verdicts on measured trials: a loss curve summarised, a remedy's row against the baseline's.

"fixes it" needs all of (what the doctor calls a repair, and nothing less):

- **the findings gone** — no problem finding of a kind the baseline had, and no
  *critical* finding of a new kind (a remedy that trades vanishing for dead
  units has not repaired the net);
- **a finite loss** — the mean of the last 10 % of steps, every seed;
- **real learning** — every seed's final loss at most half its own first finite
  loss (:data:`LEARNED_BELOW`); the mean final loss at most half where the
  untouched baseline started (so inf → 10¹⁰, or a remedy that starts higher
  and merely falls back, is no repair) and clearly below the loss of a constant
  output (:data:`NULL_BELOW` of :func:`gradwatch.trial.null_loss`: chance for
  cross-entropy, so 109 → 12 on ten classes is no repair; Var(y) for mean
  squared error, so a net that learned to predict the mean is none); a mean
  final loss at most :data:`WORSE_LOSS_ABOVE` × the baseline's final one (a
  run that ends worse than the pathology on the same objective has not
  repaired it); and where the set-up has a held-out score, that
  score clearly above the baseline's (:func:`margin`: :data:`SCORE_MARGIN`, or that
  share of the baseline's magnitude where it is beyond 1) and above the score
  of that constant output, where the set-up's ``evaluate`` can score one
  (:func:`gradwatch.trial.null_score`: R² or D² at the training mean, 0, where
  the baseline's is −1). A set-up that says
  its loss does not show learning (``Trial.judge_by_score``: a GAN's generator
  loss) is judged by the score alone; so is a loss that starts at or below
  zero (a likelihood with a learned variance: "half" of it means nothing),
  and one that ends below minus its start (a loss unbounded below). A
  constant output's loss at or below zero is no ceiling (a learned variance
  that a constant drives to zero on constant pixels: −37.7 there, below a
  VAE fixed by a variance floor, −29). A remedy that weighs the loss's
  samples otherwise (``pos_weight``, ``class_weight``) makes another
  objective: its loss must halve from its own first loss and end clearly
  below its own constant output's (on the same objective), and its score
  rise; the baseline's loss is not its to compare (a weighted cross-entropy
  over overlapping classes, 0.77 → 0.45 against ln 2 for a constant, at a
  balanced accuracy of 0.74 against 0.50, is then the closest row, not a fix).

A row whose loss started above 0 and ends below it, where a finding of the baseline said its loss has no minimum
(``bounded_objective``), is no fix either: it slowed the fall (:func:`still_unbounded`).

A row that diverged where the baseline diverged too is "no change (diverged,
as the baseline did)", not "worse".
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.doctor.table import TrialResult
from gradwatch.doctor.trial_run import TrialRun

LEARNED_BELOW = 0.5  # "really learns": the final loss is at most this fraction of the run's first finite loss
SCORE_MARGIN = 0.05  # "clearly better": a held-out score (1 = perfect) at least this much above the baseline's
NULL_BELOW = 0.9  # "clearly below a constant output": the null loss is measured on a few batches (±10 %)
SCORE_OVERRULES = 0.5  # a held-out score this much above the baseline's outweighs a training loss above its
FLAT_ABOVE = 0.9  # a loss that ends above this fraction of its first did not fall (where a constant's is unmeasured)
FITTED_BELOW = 0.1  # a training loss this fraction of a constant output's or less: the training batches fitted
FITS_BELOW = 0.8  # "fits its training batches": a training loss this fraction or less of a constant output's
WORSE_LOSS_ABOVE = 2.0  # a scored row whose score did not clearly rise is "worse" when its final loss more than doubled



def curve(losses: list[float]) -> tuple[float, float, float, bool]:
    """(first finite loss, final loss = mean of the last 10 %, mean loss, learned) of one run's own loss curve."""
    arr = np.array(losses, dtype=float)
    finite = arr[np.isfinite(arr)]
    first = float(finite[0]) if len(finite) else math.inf
    tail = arr[-max(1, len(arr) // 10):]
    final = float(np.mean(tail)) if np.isfinite(tail).all() else math.inf
    auc = float(np.mean(arr)) if np.isfinite(arr).all() else math.inf
    learned = math.isfinite(final) and math.isfinite(first) and first > 0 and final <= LEARNED_BELOW * first
    return first, final, auc, learned


def summary(label: str, runs: list[TrialRun], seconds: float) -> TrialResult:
    """One row from a remedy's (or the baseline's) runs, one per seed: means over seeds, findings over all."""
    curves = [curve(run.losses) for run in runs]
    kinds = sorted({k for run in runs for k in run.findings})
    problems: dict[str, object] = {}
    for run in runs:
        for f in run.diagnosis.problems:
            problems.setdefault(f.kind, f)
    critical = sorted({f.kind for run in runs for f in run.diagnosis.problems if f.severity == "critical"})
    nulls = [run.null_loss for run in runs if math.isfinite(run.null_loss)]
    null_scores = [run.null_score for run in runs if math.isfinite(run.null_score)]
    return TrialResult(label, float(np.mean([c[1] for c in curves])), float(np.mean([c[2] for c in curves])),
                       float(np.mean([run.score for run in runs])), kinds, seconds,
                       first_loss=float(np.mean([c[0] for c in curves])), learned=all(c[3] for c in curves),
                       critical=critical, problems=tuple(problems.values()),  # type: ignore[arg-type]
                       null_loss=float(np.mean(nulls)) if nulls else math.nan,
                       null_score=float(np.mean(null_scores)) if len(null_scores) == len(runs) else math.nan,
                       judge_by_score=any(run.judge_by_score for run in runs),
                       rescored_bn=any(run.rescored_bn for run in runs),
                       changed=next((run.changed for run in runs if run.changed), ""),
                       own_objective=any(run.own_objective for run in runs))


def margin(base: TrialResult) -> float:
    """How far above the baseline's score a row's must be to be clearly better: :data:`SCORE_MARGIN` on a score
    within ±1 of 0 (an accuracy, an R² near its scale), that share of the baseline's own magnitude beyond it.
    Round 28: a TD value net at R² −103 (its twin 0.92–1.00) was called fixed by LayerNorm at −100, confirmed on a
    seed of its own — 0.05 on a score a hundred times that scale is no evidence of anything."""
    return SCORE_MARGIN * max(1.0, abs(base.score)) if math.isfinite(base.score) else SCORE_MARGIN


def still_unbounded(base: TrialResult, trial: TrialResult) -> bool:
    """The baseline's loss was found to have no minimum (a finding of it names ``bounded_objective``) and the row's
    loss, which started above 0, ends below 0: the row slowed its fall, it did not give it a floor (round 30: a
    binary cross-entropy on targets outside [0, 1]; learning rate ×0.1 ended at −1.6 in 200 steps and −427 in 600,
    held out −0.44 against 0.58 on targets in [0, 1], and was called a fix)."""
    return (any("bounded_objective" in f.remedy_keys for f in base.problems)
            and trial.first_loss > 0 and trial.final_loss < 0)


def learns(base: TrialResult, trial: TrialResult) -> bool:
    """Real learning, measured (the module's docstring): the loss tests unless the set-up is judged by its score,
    and a clearly better held-out score wherever both rows have one; never a loss that still falls through 0 where
    the baseline's had no minimum (:func:`still_unbounded`)."""
    if still_unbounded(base, trial):
        return False
    scored = math.isfinite(base.score) and math.isfinite(trial.score)
    better_score = scored and trial.score >= base.score + margin(base) and not below_constant(trial)
    if trial.judge_by_score:
        return better_score
    if not math.isfinite(trial.final_loss):
        return False
    if not trial.first_loss > 0:  # a loss that starts at or below 0: no "half" of it
        return better_score
    if trial.final_loss < -trial.first_loss:
        # fell through 0 to below minus its start: a loss unbounded below, its "halving" no evidence of learning
        # (round 27: loss weights learned as free multipliers, Σ w_i·L_i; clipping "fixed" it at a loss of −9.5·10⁵
        # and R² −2.4·10⁵, the baseline's score NaN); the held-out score alone decides
        return better_score
    if not trial.learned:
        return False
    if trial.own_objective:  # a loss that weighs the samples otherwise: its own start and its own constant output
        null = trial.null_loss
    else:
        if base.first_loss > 0 and math.isfinite(base.first_loss) and trial.final_loss > LEARNED_BELOW * base.first_loss:
            return False
        null = base.null_loss if math.isfinite(base.null_loss) else trial.null_loss
    if null > 0 and trial.final_loss > NULL_BELOW * null:  # NaN and a ceiling at or below 0: none
        return False
    if ends_above_base(base, trial):
        return False
    return better_score or not scored


def did_not_learn(row: TrialResult) -> str:
    """Words for a row (a baseline with no findings) that did not learn ('' where it did, or nothing shows it): its
    held-out score not clearly above a constant output's where both are measured; else — where its loss shows
    learning — a final loss no lower than a constant output's, or above :data:`FLAT_ABOVE` × its first. A loss that
    falls but has not halved in a short trial is learning (a healthy MLP: 2.88 → 2.17 in 30 steps, a constant's
    2.30, held out 0.26 against 0.10). Round 19: "nothing to fix" and "healthy" on a regression at R² 0.04 (1.14 → 1.005,
    a constant's 1.0) and on a bfloat16 net at 0.14 on ten classes (2.301 → 2.294)."""
    if math.isfinite(row.score) and math.isfinite(row.null_score):
        if below_constant(row):
            return f"score {row.score:.3g} against a constant output's {row.null_score:.3g}"
        if (not row.judge_by_score and row.null_loss > 0 and math.isfinite(row.final_loss)
                and row.final_loss > FLAT_ABOVE * row.null_loss and row.final_loss > FLAT_ABOVE * row.first_loss):
            # round 37: a cross-entropy flat at ln 10 (2.302 → 2.301) scored 0.39 where a constant scores 0.09, and
            # was called "healthy": a score above a constant's does not make a flat loss at a constant's a learner
            # (round 42: 2.294 → 3.194 under a constant's 2.303 read "about" it; above it by a tenth, it is above)
            near = "about" if row.final_loss <= 1.1 * row.null_loss else "above"
            return (f"its loss went {row.first_loss:.4g} → {row.final_loss:.4g}, {near} a constant output's "
                    f"{row.null_loss:.4g}, though it scores {row.score:.3g} against a constant's {row.null_score:.3g}")
        return ""
    if row.judge_by_score or not row.first_loss > 0 or not math.isfinite(row.final_loss):
        return ""
    if row.null_loss > 0 and row.final_loss >= row.null_loss:
        return (f"its loss went {row.first_loss:.4g} → {row.final_loss:.4g}, no lower than a constant output's "
                f"{row.null_loss:.4g}")
    if row.final_loss > FLAT_ABOVE * row.first_loss:
        return f"its loss went {row.first_loss:.4g} → {row.final_loss:.4g}"
    return ""


def fits_only_training(row: TrialResult) -> str:
    """Words where a row fits its training batches — a final loss :data:`FITS_BELOW` × a constant output's or less —
    while its held-out score is not clearly above a constant's ('' otherwise): what it learned does not carry to
    held-out data. Round 22: a regression whose inputs and targets were shuffled apart (two independent shuffles),
    its training loss 1.0 → 0.6 against a constant's 1.0, held out R² −0.15 to −0.21, told only "did not learn"."""
    if not (below_constant(row) and math.isfinite(row.score) and 0 < row.null_loss < math.inf
            and math.isfinite(row.final_loss) and row.final_loss <= FITS_BELOW * row.null_loss):
        return ""
    return (f"its training loss fell to {row.final_loss / row.null_loss:.2f} of a constant output's while its held-out "
            f"score is not above a constant's: it fits its training batches and nothing of it carries to held-out "
            f"data — inputs and targets that do not belong together (shuffled apart, misaligned by a reshape or an "
            f"index), or a held-out set prepared otherwise than the training set (its own scaling, its labels mapped "
            f"otherwise)")


def ends_above_base(base: TrialResult, trial: TrialResult) -> bool:
    """The row's final loss is more than :data:`WORSE_LOSS_ABOVE` × the baseline's (a finite, positive one): on the
    same objective it ended worse than the pathology did. Round 15: a sparse autoencoder whose latents all died
    ends at its mean's reconstruction, 0.95; LeakyReLU + He + lr ×0.1 kept them alive but ended at 9.1 (R² 0.12
    against the healthy twin's 0.82), and was called a fix — the constant output's loss that would have caught it
    could not be measured on a model that returns (reconstruction, code). A held-out score
    :data:`SCORE_OVERRULES` or more above the baseline's overrules the training loss: a baseline can memorise its
    training points and generalise worse than a constant."""
    scored = math.isfinite(base.score) and math.isfinite(trial.score)
    if trial.own_objective:
        return False  # another objective: its loss is not the baseline's to compare
    if scored and trial.score >= base.score + SCORE_OVERRULES:
        return False  # the baseline memorised its training set (round 15's SIREN: loss 7e-9, R² −0.25 held out)
    if (scored and 0 < base.null_loss < math.inf and base.final_loss <= FITTED_BELOW * base.null_loss
            and trial.score >= base.score + margin(base)):
        # the baseline fitted its training batches almost perfectly and the row generalises clearly better (round
        # 24: a float causal mask let an LM see its next token, loss 0.10 against a constant's 2.77, held out 0.11;
        # masked, 1.15 and 0.52)
        return False
    return 0 < base.final_loss < math.inf and trial.final_loss > WORSE_LOSS_ABOVE * base.final_loss


def below_constant(trial: TrialResult) -> bool:
    """The row's held-out score is not clearly above a constant output's (``null_score``; False where that is
    unmeasured): on a score with no fixed chance level (R², D²: 0 is the training mean; a baseline at −1), a
    score above the baseline's can still be one that predicting the mean would beat (round 12: clipping at
    D² −0.16 against a baseline's −1, "fixes it", where input standardisation reached 0.50)."""
    return math.isfinite(trial.null_score) and trial.score < trial.null_score + SCORE_MARGIN


def is_better(base: TrialResult, trial: TrialResult) -> bool:
    """Clearly better than the baseline: a held-out score :func:`margin` above it where both rows have one, else
    a final loss below 0.9 × the baseline's."""
    if math.isfinite(base.score) and math.isfinite(trial.score):
        return trial.score >= base.score + margin(base)
    return trial.final_loss < 0.9 * base.final_loss


def verdict(base: TrialResult, trial: TrialResult, targets: set[str]) -> str:
    """Judged only on what was measured: the findings left or brought, the loss curve, the held-out score."""
    if not math.isfinite(trial.final_loss) and not trial.judge_by_score:
        return "no change (diverged, as the baseline did)" if not math.isfinite(base.final_loss) else "worse (diverged)"
    left = targets & set(trial.findings)
    brought = sorted(set(trial.critical) - set(base.findings))  # critical findings of kinds the baseline had not
    scored = math.isfinite(base.score) and math.isfinite(trial.score)
    better = is_better(base, trial)
    if scored:
        worse = trial.score <= base.score - margin(base)
        # the same score at chance is no evidence the remedy did nothing: a loss that more than doubled says it did harm
        worse = worse or (not better and not trial.judge_by_score and not trial.own_objective
                          and trial.final_loss > WORSE_LOSS_ABOVE * base.final_loss)
    else:
        worse = trial.final_loss > 1.1 * base.final_loss
    learned = learns(base, trial)
    if not left and not brought and learned:
        return "fixes it"
    if not left and not brought and still_unbounded(base, trial):
        return "removes the finding; its loss still falls below 0, where the baseline's had no minimum"
    if not left and brought:
        return f"removes the finding; brings {', '.join(brought)}"
    if brought and not better:
        return f"worse (brings {', '.join(brought)})"
    if not left and not worse:
        if better and ends_above_base(base, trial) and not trial.judge_by_score:
            return (f"removes the finding; a better score, but its loss ends at "
                    f"×{trial.final_loss / base.final_loss:.3g} the baseline's")
        if better and scored and below_constant(trial):
            return f"removes the finding; a better score, but not above a constant output's ({trial.null_score:.3f})"
        if better and scored:  # the score says it learned something; the loss, that it did not learn enough
            return "removes the finding; a better score, but the loss did not halve"
        return "removes the finding; does not learn" if not trial.learned else "removes the finding; no better"
    if better:
        return "helps; finding remains"
    return "worse" if worse else "no change"
