"""Errors and the one template every argument error uses."""

from __future__ import annotations

from typing import Any


class GradwatchWarning(UserWarning):
    """Something went wrong inside a watch; training goes on, recording stops."""


class NotARunError(ValueError):
    """A path that holds a file, but not a readable gradwatch run: another tool's database, a damaged file."""


def describe(value: Any) -> str:
    """Short description of a bad argument for an error message."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, (int, float, str, bool)) or value is None:
        return text
    return f"{type(value).__name__} {text}" if not text.startswith(type(value).__name__) else text


def bad_argument(call: str, arg: str, expected: str, got: Any) -> str:
    """The message for a bad argument: "`watch(every=…)` expects a positive int, got -3"."""
    return f"`{call}({arg}=…)` expects {expected}, got {describe(got)}"
