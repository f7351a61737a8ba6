"""What each catalogue entry changes (its knobs), shared by the catalogue, which combines entries, and the table,
which tells the row that adds something from the one it trained exactly as."""

from __future__ import annotations

# What an entry changes, where two entries would change the same thing: a combination takes each at most once
# (two learning-rate cuts stack to a rate no short trial learns at, clipping twice is clipping once), which leaves a
# round's room (the catalogue's ROUND_WIDTH) to combinations that differ.
SAME_KNOB: dict[str, frozenset[str]] = {
    "lower_lr": frozenset({"lr_cut"}),
    "raise_lr": frozenset({"lr_cut"}),  # the same knob, the other way: never with a cut
    "clip_norm": frozenset({"clip"}),
    "clip_lower_lr": frozenset({"clip", "lr_cut"}),
    # the initialisations: the later overwrites the earlier (round 7's "Xavier + Xavier init + lr ×0.1" row)
    "he_init": frozenset({"init"}),
    "lecun_init": frozenset({"init"}),
    "rescale_weights": frozenset({"init"}),
    "orthogonal_init": frozenset({"init"}),
    "smaller_init": frozenset({"init"}),
    "identity_init": frozenset({"init"}),
    "relu": frozenset({"init"}),  # ReLU + He
    "leaky": frozenset({"init"}),  # LeakyReLU + He
    "smaller_init_lower_lr": frozenset({"init", "lr_cut"}),
    "leaky_lower_lr": frozenset({"init", "lr_cut"}),
    "zero_grad_raise_lr": frozenset({"lr_cut"}),
    "mean_reduction_raise_lr": frozenset({"lr_cut"}),
    "divide_accumulated": frozenset({"lr_cut"}),
}


def knobs(parts: tuple[str, ...]) -> frozenset[str]:
    """The knobs that the entries ``parts`` change."""
    return frozenset().union(*(SAME_KNOB.get(part, ()) for part in parts))


def weight(parts: tuple[str, ...]) -> int:
    """How much a row changes: one per entry, or per knob where an entry turns several (clipping + a lower
    learning rate is two). Among rows that tie, the lighter is the one to recommend."""
    return sum(max(1, len(SAME_KNOB.get(part, ()))) for part in parts)
