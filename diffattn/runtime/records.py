"""What an application keeps about the attention calls it saw: bounded call records, acted pairs, metric sums."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["CallRecord", "Records", "RECENT_CALLS"]

RECENT_CALLS = 2048


@dataclass(frozen=True)
class CallRecord:
    """One attention call: at which step, on which layer, and whether the method acted."""

    step: int | None
    layer: str
    role: str
    acted: bool


class Records:
    """Bounded records of one application: recent calls, (step, layer) pairs acted on, per-layer metric sums."""

    def __init__(self, recent: int = RECENT_CALLS) -> None:
        self.calls: deque[CallRecord] = deque(maxlen=recent)
        self.acted: set[tuple[int | None, str]] = set()
        self.acted_calls: dict[str, int] = {}
        self._sums: dict[str, dict[str, list[float]]] = {}  # layer -> name -> [sum, count]

    def record(self, step: int | None, layer: str, role: str, acted: bool) -> None:
        self.calls.append(CallRecord(step, layer, role, acted))
        if acted:
            self.acted.add((step, layer))
            self.acted_calls[layer] = self.acted_calls.get(layer, 0) + 1

    def report(self, layer: str, metrics: dict[str, float]) -> None:
        per_layer = self._sums.setdefault(layer, {})
        for name, value in metrics.items():
            total = per_layer.setdefault(name, [0.0, 0])
            total[0] += float(value)
            total[1] += 1

    def metrics(self) -> dict[str, dict[str, float]]:
        return {layer: {name: s / n for name, (s, n) in per.items()} for layer, per in self._sums.items()}

    def clear(self) -> None:
        self.calls.clear()
        self.acted.clear()
        self.acted_calls.clear()
        self._sums.clear()
