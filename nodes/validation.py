"""Checks for the nodes' `validate_inputs`: a bad value is refused at /prompt, before anything runs.

ComfyUI skips its own min/max/choice checks for every input a node's `validate_inputs`
takes, and NaN passes them anyway (every comparison with NaN is false), so the checks here
cover range, finiteness and choice for the inputs they are given. Each returns None when the
value is fine, or a message that names the input (ComfyUI files a failed `validate_inputs`
under all of its inputs). A value of None means the input is linked to another node's
output: it is checked when the node runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def choice_error(name: str, value: object, options: Sequence[str]) -> str | None:
    """Why a combo value is refused (ComfyUI 0.3.64 does not check V3 combo values at all)."""
    if value is None or value in options:
        return None
    shown = list(options) if len(options) <= 20 else f"{len(options)} choices"
    return f"{name} must be one of {shown}; got {value!r}"


def number_error(name: str, value: object, low: float, high: float) -> str | None:
    """Why a number is refused: not a finite number, or outside [low, high]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{name} must be a finite number from {low} to {high}; got {value!r}"
    if not low <= value <= high:
        return f"{name} must be from {low} to {high}; got {value!r}"
    return None


def bool_error(name: str, value: object) -> str | None:
    """Why a switch is refused: anything but true or false (bool("false") would be True)."""
    if value is None or isinstance(value, bool):
        return None
    return f"{name} must be true or false; got {value!r}"


def multiple_error(
    name: str, value: object, multiple: int, low: int, high: int, *, zero: bool = False
) -> str | None:
    """Why a size is refused: not an integer multiple of `multiple` in [low, high] (or 0 if `zero`)."""
    if value is None or (zero and value == 0):
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value % multiple
        or not low <= value <= high
    ):
        allowed = "0 (auto) or " if zero else ""
        return (
            f"{name} must be {allowed}a multiple of {multiple} from {low} to {high}; got {value!r}"
        )
    return None


def first_error(*errors: str | None) -> str | bool:
    """What `validate_inputs` returns: the first message, or True when there is none."""
    return next((e for e in errors if e), True)
