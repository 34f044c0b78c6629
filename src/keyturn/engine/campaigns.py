"""A campaign's progress: its rotations counted by where each is, in its kind's words (one
definition for the CLI, the dashboard and /metrics)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from keyturn.engine.registry import Registry
from keyturn.ports import Store


def progress(
    store: Store, registry: Registry, now: datetime, campaign: str | None = None
) -> dict[str, dict[str, int]]:
    """{campaign: {label: count}} for every campaign (or the one named), each of its kinds'
    labels present (0 when none), in the kinds' order."""
    counts: dict[str, Counter[str]] = {}
    labels: dict[str, list[str]] = {}
    for r in store.campaign_rotations(campaign):
        assert r.campaign is not None
        kind = registry.kind(r.kind)
        counts.setdefault(r.campaign, Counter())[kind.progress_label(r, now)] += 1
        known = labels.setdefault(r.campaign, [])
        known.extend(x for x in kind.progress_labels if x not in known)
    out = {}
    for name in sorted(counts):
        c = counts[name]
        order = labels[name] + sorted(set(c) - set(labels[name]))
        out[name] = {label: c.get(label, 0) for label in order}
    return out
