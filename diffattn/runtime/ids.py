"""One process-wide counter for application ids and attention-hook keys (so no id is ever both)."""

from __future__ import annotations

import itertools

__all__ = ["next_id"]

_IDS = itertools.count(1)


def next_id() -> int:
    return next(_IDS)
