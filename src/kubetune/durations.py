"""Durations as people read them in `kubectl get` and in logs."""

from __future__ import annotations


def format_duration(seconds: float | None) -> str:
    """`4h05m`, `12m30s`, `42s`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
