"""What a diagnosis says: findings with their evidence, cause and remedies."""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from typing import Iterator

@dataclass(frozen=True)
class Finding:
    """One pathology: what, where (layers, steps), the measured evidence, the likely cause, the remedies."""

    kind: str  # nonfinite, skipped_steps, exploding, vanishing, saturation, dead_units or stalled
    severity: str  # "critical", "warning" or "info" (measured, but not hurting training)
    layers: tuple[str, ...]  # affected layers (or activation modules), in depth order
    steps: tuple[int, int]  # first and last step where it holds
    summary: str  # one line
    evidence: str  # the measurements, in words and numbers
    cause: str
    remedies: tuple[str, ...]
    numbers: dict[str, float] = field(default_factory=dict)  # the measured values behind the words
    sources: tuple[str, ...] = ()  # which stored records the numbers come from
    # The cause's key for a depth finding, as gw.check names it (gradwatch.diagnosis.measures.Cause): dead,
    # saturation, activation, weights, jacobians or unmeasured, or "loop" where the stretch crosses a module called
    # repeatedly in one forward pass; "" for the other findings.
    cause_key: str = ""

    @property
    def remedy_keys(self) -> tuple[str, ...]:
        """The vocabulary keys of :attr:`remedies` (gradwatch.diagnosis.remedies), in order; texts with no key are left out."""
        from gradwatch.diagnosis.remedies import key_of

        keys = (key_of(text) for text in self.remedies)
        return tuple(k for k in keys if k is not None)

    def __str__(self) -> str:
        lines = [
            f"[{self.severity}] {self.kind}: {self.summary}",
            f"  evidence: {self.evidence}",
            f"  cause:    {self.cause}",
        ]
        if self.remedies:  # an info finding needs none: no empty line that reads as if some were missing
            lines.append(f"  remedies: {'; '.join(self.remedies)}")
        if self.sources:
            lines.append(f"  source:   {'; '.join(self.sources)}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """The finding as one HTML block: what, evidence, cause, remedies, source."""
        e = html.escape
        items = "".join(f"<li>{e(r)}</li>" for r in self.remedies)
        return (f'<div class="finding {e(self.severity)}" data-kind="{e(self.kind)}"><h3>[{e(self.severity)}] '
                f"{e(self.kind)}: {e(self.summary)}</h3><dl><dt>evidence</dt><dd>{e(self.evidence)}</dd>"
                f"<dt>cause</dt><dd>{e(self.cause)}</dd>"
                + (f"<dt>remedies</dt><dd><ul>{items}</ul></dd>" if self.remedies else "") + "</dl>"
                f'<div class="source">source: {e("; ".join(self.sources))}</div></div>')


@dataclass
class Diagnosis:
    """The findings of one run, most severe first. Its ``str`` is the text a user reads."""

    findings: list[Finding]
    run: str = ""

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __bool__(self) -> bool:
        return bool(self.findings)

    def __getitem__(self, i: int) -> Finding:
        return self.findings[i]

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self.findings]

    @property
    def problems(self) -> list[Finding]:
        """The findings that hurt training (critical or warning); ``info`` ones are measured but harmless."""
        return [f for f in self.findings if f.severity != "info"]

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def __str__(self) -> str:
        if not self.findings:
            return "No findings: the gradients look healthy."
        head = f"{len(self.findings)} finding{'s' if len(self.findings) > 1 else ''}"
        return head + (f" in {self.run}" if self.run else "") + ":\n\n" + "\n\n".join(map(str, self.findings))

    def __repr__(self) -> str:
        return f"Diagnosis({self.kinds})"

    def to_html(self) -> str:
        """The findings as HTML (the report's findings section; styled by :data:`FINDINGS_CSS`)."""
        if not self.findings:
            return '<div class="healthy" id="findings-none">No findings: the gradients look healthy.</div>'
        return "\n".join(f.to_html() for f in self.findings)

    def _repr_html_(self) -> str:
        """In a notebook: the findings, then the run's signature plot (log ‖∂L/∂W‖, layers × steps) and the
        gradient-vs-depth profile, drawn from the stored records when the run is still where it was."""
        from gradwatch.plots import figures_of_run

        return f"<div><style>{FINDINGS_CSS}</style>{self.to_html()}{figures_of_run(self.run)}</div>"


FINDINGS_CSS = """
.finding { border-left: 5px solid #e0a800; background: #fffbea; padding: .6em 1em; margin: .8em 0; }
.finding.critical { border-color: #d0021b; background: #fff0f0; }
.finding.info { border-color: #7a9cc6; background: #f3f7fc; }
.finding h3 { margin: 0 0 .3em; font-size: 1.05em; } .finding dl { margin: 0; }
.finding dt { font-weight: 600; float: left; width: 6.5em; } .finding dd { margin: 0 0 .25em 6.5em; }
.finding .source { color: #777; font-size: .85em; }
.healthy { border-left: 5px solid #2e9d4b; background: #effaf1; padding: .6em 1em; }
"""


def layer_name(name: str) -> str:
    """A layer's name as findings print it: its ``named_modules()`` path, ``(root)`` for the model itself."""
    return name or "(root)"


def modules_span(names: list[str] | tuple[str, ...]) -> str:
    """:func:`span` with "module " before a bare index (a ``nn.Sequential``'s child, "1"), so that "the units of
    module 1" is not read as "the units of the first layer" (round 19)."""
    bare = bool(names) and all(n.isdigit() for n in names)
    return f"module{'s' if bare and len(names) > 1 else ''} {span(names)}" if bare else span(names)


def listed(names: list[str] | tuple[str, ...], most: int = 5) -> str:
    """'0, 2, 4' for up to ``most`` names; beyond, the first ``most`` − 1 and "and N more"."""
    shown = [str(n) for n in names]
    if len(shown) <= most:
        return ", ".join(shown)
    return ", ".join(shown[:most - 1]) + f" and {len(shown) - most + 1} more"


def span(names: list[str] | tuple[str, ...], total: int | None = None) -> str:
    """'0…36 (19 of 20)' for a list of names; the model itself (named "") is '(root)'."""
    if not names:
        return "none"
    first, last = layer_name(names[0]), layer_name(names[-1])
    text = first if len(names) == 1 else f"{first}…{last}"
    if total is not None and len(names) > 1:
        text += f" ({len(names)} of {total})"
    return text


def sci(x: float) -> str:
    """Two significant digits, scientific below 0.01 and above 1000."""
    if x != x:
        return "NaN"
    if x == 0:
        return "0"
    if abs(x) < 1e-2 or abs(x) >= 1e3:
        return f"{x:.1e}"
    return f"{x:.2g}"


def told_cause(found: list[Finding], words: str, fixes: tuple[str, ...], source: str) -> list[Finding]:
    """``found`` with every problem (not ``info``) that does not name ``fixes``' first key already told a cause of
    the set-up first — ``words``, then "besides," its own — with ``fixes`` (remedy texts) before its remedies and
    ``source`` beside its sources."""
    from gradwatch.diagnosis.remedies import key_of

    key = key_of(fixes[0])
    return [replace(f, cause=f"{words}; besides, {f.cause}", remedies=tuple(fixes) + tuple(f.remedies),
                    sources=(*f.sources, source))
            if f.severity != "info" and key not in f.remedy_keys else f for f in found]
