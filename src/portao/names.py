"""Name rules for routes, rooms and users: they become broker keys."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def is_valid_name(name: object) -> bool:
    """True for a string that matches `[A-Za-z0-9_.:-]{1,128}`."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None
