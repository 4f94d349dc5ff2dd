"""Reading numbers out of headers and query strings that anyone may write."""

from __future__ import annotations


def ascii_int(value: str) -> int | None:
    """`value` as a non-negative integer if it is ASCII digits only, else None.

    `str.isdigit()` alone is not enough: it is true for "²" (which is also the Latin-1
    byte 0xB2 of a header), which `int()` then refuses, and for other scripts' digits,
    which no HTTP number is written in. `int()` also refuses more than 4300 digits.
    """
    if not (value.isascii() and value.isdigit()):
        return None
    try:
        return int(value)
    except ValueError:  # longer than sys.get_int_max_str_digits(): no usable number
        return None
