"""The lifecycle graph as an inline SVG, drawn from the graph data (keyturn.domain.lifecycle's
EDGES and FORWARD), with the rotation's current state marked. No layout library: the forward
path is one row, the way back and the cancellation a second row under it."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

from keyturn.domain.lifecycle import EDGES, FORWARD, State

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 132, 34, 36, 70, 10


@dataclass(frozen=True)
class Node:
    state: State
    x: int
    y: int


def layout() -> dict[State, Node]:
    """The forward chain (from FORWARD, starting at pending) on the first row; every other
    state on the second row, in the order the edges reach it."""
    row: list[State] = [State.PENDING]
    while row[-1] in FORWARD:
        nxt = next(
            (e.dest for e in EDGES if e.source == row[-1] and e.trigger == FORWARD[row[-1]]), None
        )
        if nxt is None or nxt in row:
            break
        row.append(nxt)
    rest: list[State] = []
    for e in EDGES:
        for s in (e.source, e.dest):
            if s not in row and s not in rest:
                rest.append(s)
    for s in State:
        if s not in row and s not in rest:
            rest.append(s)

    def under(s: State) -> float:
        """Where a second-row state sits: under the mean of its first-row sources."""
        found = [row.index(e.source) for e in EDGES if e.dest == s and e.source in row]
        return sum(found) / len(found) if found else len(row) + seen.index(s)

    seen = list(rest)
    rest.sort(key=under)
    nodes = {}
    for i, s in enumerate(row):
        nodes[s] = Node(s, PAD + i * (BOX_W + GAP_X), PAD)
    for i, s in enumerate(rest):
        nodes[s] = Node(s, PAD + i * (BOX_W + GAP_X), PAD + BOX_H + GAP_Y)
    return nodes


def svg(current: State | None, *, rollback_from: State | None = None) -> Markup:
    """The graph; `current` is filled and labelled "(now)"."""
    nodes = layout()
    width = max(n.x for n in nodes.values()) + BOX_W + PAD
    height = max(n.y for n in nodes.values()) + BOX_H + PAD
    parts = [
        f'<svg class="graph" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="graph-title" xmlns="http://www.w3.org/2000/svg">',
        '<title id="graph-title">Lifecycle graph'
        + (f": the rotation is now {escape(current.value)}" if current else "")
        + "</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="currentColor"/></marker></defs>',
    ]
    for e in EDGES:
        a, b = nodes[e.source], nodes[e.dest]
        x1, y1, x2, y2 = _ends(a, b)
        cls = "edge" + (" taken" if rollback_from is not None and e.source == rollback_from else "")
        parts.append(
            f'<g class="{cls}"><line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" '
            f'stroke="currentColor" marker-end="url(#arrow)"/>'
            f"<title>{escape(e.trigger.value)}: {escape(e.source.value)} to "
            f"{escape(e.dest.value)}</title></g>"
        )
    for n in nodes.values():
        now = n.state == current
        cls = "node now" if now else "node"
        label = n.state.value + (" (now)" if now else "")
        parts.append(
            f'<g class="{cls}" data-state="{escape(n.state.value)}">'
            f'<rect x="{n.x}" y="{n.y}" width="{BOX_W}" height="{BOX_H}" rx="6"/>'
            f'<text x="{n.x + BOX_W // 2}" y="{n.y + BOX_H // 2 + 5}" '
            f'text-anchor="middle">{escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every interpolated value is escaped above)


def _ends(a: Node, b: Node) -> tuple[int, int, int, int]:
    """From the edge of box `a` to the edge of box `b` (horizontal, vertical or diagonal)."""
    if a.y == b.y:
        if b.x > a.x:
            return a.x + BOX_W, a.y + BOX_H // 2, b.x, b.y + BOX_H // 2
        return a.x, a.y + BOX_H // 2, b.x + BOX_W, b.y + BOX_H // 2
    down = b.y > a.y
    y1 = a.y + BOX_H if down else a.y
    y2 = b.y if down else b.y + BOX_H
    return a.x + BOX_W // 2, y1, b.x + BOX_W // 2, y2
