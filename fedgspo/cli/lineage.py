"""A :class:`~fedgspo.cli.rundir.Lineage` as indented text, Graphviz DOT or a PNG picture.

The PNG comes from the ``dot`` binary when it is on ``PATH``, else from matplotlib (a layered
drawing: each node one row below its deepest parent), so a picture can always be made where
matplotlib is installed.

Failure behaviour: :func:`render_png` raises ``ImportError`` when neither ``dot`` nor
matplotlib is available (``engine="dot"`` without the binary: ``FileNotFoundError``), and
``subprocess.CalledProcessError`` if ``dot`` fails; text and DOT never fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fedgspo.entities.tree import topological_order
from fedgspo.cli.rundir import Lineage, LineageNode

_SHAPES = {"stage": "folder", "origin": "ellipse", "checkpoint": "box"}
_COLORS = {"stage": "#dbe8f6", "origin": "#f6efd2", "checkpoint": "#e3f2e1"}


def _caption(node: LineageNode) -> str:
    marks = " [this run]" if node.current else ""
    return f"{node.label} ({node.detail}){marks}" if node.detail else node.label + marks


def render_text(lineage: Lineage) -> str:
    """One line per node, children indented under their parent with tree glyphs; a node with
    several parents is printed under each (its subtree once, later as ``...``)."""
    lines = [lineage.title]
    printed: set[str] = set()

    def walk(node_id: str, prefix: str, last: bool, edge: str) -> None:
        glyph = "└─ " if last else "├─ "
        via = f"({edge}) " if edge else ""
        repeat = node_id in printed
        lines.append(f"{prefix}{glyph}{via}{_caption(lineage.nodes[node_id])}{' ...' if repeat else ''}")
        if repeat:
            return
        printed.add(node_id)
        children = lineage.children(node_id)
        for i, (child, label) in enumerate(children):
            walk(child, prefix + ("   " if last else "│  "), i == len(children) - 1, label)

    roots = lineage.roots()
    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1, "")
    if not lineage.nodes:
        lines.append("(no checkpoints)")
    return "\n".join(lines)


def _quote(*lines: str) -> str:
    """A DOT string literal; several ``lines`` are joined with DOT's ``\\n``."""
    return '"' + "\\n".join(t.replace("\\", "\\\\").replace('"', '\\"') for t in lines) + '"'


def render_dot(lineage: Lineage) -> str:
    """Graphviz DOT source: one node per entry (shape by kind, dashed when gone from disk,
    bold for this run's stage) and labelled edges."""
    out = ["digraph lineage {", f"  label={_quote(lineage.title)}; labelloc=t; rankdir=TB;",
           '  node [style=filled, fontname="Helvetica", fontsize=10];']
    for node in lineage.nodes.values():
        style = "filled,dashed" if not node.present else "filled,bold" if node.current else "filled"
        label = _quote(node.label, node.detail) if node.detail else _quote(node.label)
        out.append(f"  {_quote(node.id)} [label={label}, "
                   f"shape={_SHAPES[node.kind]}, fillcolor={_quote(_COLORS[node.kind])}, style={_quote(style)}];")
    for src, dst, label in lineage.edges:
        attrs = f" [label={_quote(label)}{', style=dashed' if label == 'resumed' else ''}]" if label else ""
        out.append(f"  {_quote(src)} -> {_quote(dst)}{attrs};")
    out.append("}")
    return "\n".join(out) + "\n"


def _layers(lineage: Lineage) -> dict[str, int]:
    """Row of each node: one below its deepest parent (roots on row 0)."""
    parents: dict[str, list[str]] = {n: [] for n in lineage.nodes}
    for src, dst, _ in lineage.edges:
        parents[dst].append(src)
    row: dict[str, int] = {}
    for node in topological_order(parents):
        row[node] = max((row[p] + 1 for p in parents[node]), default=0)
    return row


def _render_matplotlib(lineage: Lineage, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _layers(lineage)
    by_row: dict[int, list[str]] = {}
    for node, r in rows.items():
        by_row.setdefault(r, []).append(node)
    width = max((len(v) for v in by_row.values()), default=1)
    pos = {n: ((i + 0.5) / len(nodes) * width, -r) for r, nodes in by_row.items() for i, n in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(max(4.0, 3.2 * width), max(2.0, 1.1 * (len(by_row) + 1))))
    for src, dst, label in lineage.edges:
        ax.annotate("", xy=pos[dst], xytext=pos[src],
                    arrowprops={"arrowstyle": "->", "color": "0.35", "shrinkA": 14, "shrinkB": 14,
                                "linestyle": "--" if label == "resumed" else "-"})
        if label:
            mid = ((pos[src][0] + pos[dst][0]) / 2, (pos[src][1] + pos[dst][1]) / 2)
            ax.text(*mid, f" {label}", fontsize=7, color="0.3", va="center")
    for node_id, (x, y) in pos.items():
        node = lineage.nodes[node_id]
        ax.text(x, y, node.label + (f"\n{node.detail}" if node.detail else ""), ha="center", va="center",
                fontsize=8, fontweight="bold" if node.current else "normal",
                bbox={"boxstyle": "round,pad=0.4", "facecolor": _COLORS[node.kind],
                      "edgecolor": "0.2", "linestyle": "-" if node.present else "--"})
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-len(by_row) + 0.4, 0.6)
    ax.set_title(lineage.title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def render_png(lineage: Lineage, out: Path, engine: str = "auto") -> str:
    """Write ``out`` as PNG with ``engine`` ``dot``, ``matplotlib`` or ``auto`` (``dot`` when on
    PATH); returns the engine used."""
    dot = shutil.which("dot")
    if engine == "dot" or (engine == "auto" and dot):
        if not dot:
            raise FileNotFoundError("the Graphviz `dot` binary is not on PATH")
        subprocess.run([dot, "-Tpng", "-o", str(out)], input=render_dot(lineage), text=True, check=True,
                       capture_output=True)
        return "dot"
    _render_matplotlib(lineage, out)
    return "matplotlib"
