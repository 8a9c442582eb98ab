"""Render a speedscope profile (as py-spy writes it) into a static SVG flame graph.

py-spy writes one output format per run, and running it twice would double its cost,
so pipekit records speedscope JSON and draws the flame graph from it here. The SVG is
plain: no script, no external reference; each box carries a ``<title>`` tooltip, so a
browser shows the frame, its sample count and its share on hover.

Roots are the pseudo-frames py-spy adds with ``--threads`` (``thread (tid): name``) and
``--subprocesses`` (``process pid: "cmd"``), so the threads ``pipekit-<stage>-<n>`` of each
stage appear as separate towers.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any, Final

__all__ = ["render_svg"]

_WIDTH: Final = 1200
_PAD: Final = 10
_ROW: Final = 16
_HEADER: Final = 44
_MIN_PX: Final = 0.5
_CHAR_PX: Final = 6.6


class _Node:
    __slots__ = ("children", "label", "value")

    def __init__(self, label: str) -> None:
        self.label = label
        self.value = 0.0
        self.children: dict[int, _Node] = {}


def _labels(frames: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for frame in frames:
        name = str(frame.get("name", "?"))
        file = str(frame.get("file") or "")
        line = frame.get("line")
        if file:
            base = file.rsplit("/", 1)[-1]
            out.append(f"{name} ({base}:{line})" if line else f"{name} ({base})")
        else:
            out.append(name)
    return out


def _build_tree(speedscope: Mapping[str, Any]) -> tuple[_Node, list[str]]:
    shared = speedscope.get("shared") or {}
    labels = _labels(shared.get("frames") or [])
    root = _Node("all")
    for profile in speedscope.get("profiles") or []:
        samples = profile.get("samples") or []
        weights = profile.get("weights") or [1.0] * len(samples)
        for stack, weight in zip(samples, weights, strict=False):
            w = float(weight)
            node = root
            node.value += w
            for index in stack:
                if not isinstance(index, int) or not 0 <= index < len(labels):
                    break
                child = node.children.get(index)
                if child is None:
                    child = node.children[index] = _Node(labels[index])
                child.value += w
                node = child
    return root, labels


def _depth(root: _Node, scale: float) -> int:
    deepest = 0
    todo: list[tuple[_Node, int]] = [(root, 0)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((c, depth + 1) for c in node.children.values() if c.value * scale >= _MIN_PX)
    return deepest


def _colour(label: str) -> str:
    h = zlib.crc32(label.encode("utf-8", "replace"))
    if label.startswith(("thread (", "process ")):
        return f"rgb({120 + h % 40},{150 + (h >> 8) % 50},{210 + (h >> 16) % 40})"
    return f"rgb({205 + h % 50},{(h >> 8) % 200},{(h >> 16) % 55})"


def _box(node: _Node, *, x: float, y: float, w: float, total: float, unit: str) -> str:
    share = 100.0 * node.value / total if total else 0.0
    label = escape(node.label)
    tip = f"{label} ({node.value:g} {unit}, {share:.2f}%)"
    text = ""
    fits = int((w - 6) / _CHAR_PX)
    if fits >= 3:
        shown = node.label if len(node.label) <= fits else node.label[: fits - 2] + ".."
        text = f'<text x="{x + 3:.1f}" y="{y + 11.5:.1f}">{escape(shown)}</text>'
    return (
        f'<g><title>{tip}</title><rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
        f'height="{_ROW - 1}" rx="2" fill="{_colour(node.label)}"/>{text}</g>'
    )


def render_svg(speedscope: Mapping[str, Any], *, title: str = "CPU flame graph") -> str:
    """Draw a flame graph of a sampled speedscope profile.

    Every thread (and process) of the profile is merged under one root, with the thread
    pseudo-frames py-spy adds kept as the first level. Boxes narrower than half a pixel
    are left out.

    Args:
        speedscope: the parsed speedscope JSON.
        title: the heading drawn at the top (escaped).

    Returns:
        The SVG document as text.
    """
    root, _ = _build_tree(speedscope)
    unit = "samples"
    profiles = speedscope.get("profiles") or []
    if profiles and profiles[0].get("unit") == "seconds":
        unit = "s"
    usable = _WIDTH - 2 * _PAD
    scale = usable / root.value if root.value else 0.0
    depth = _depth(root, scale) if root.value else 0
    height = _HEADER + (depth + 1) * _ROW + _PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="monospace" font-size="11">',
        f'<rect width="{_WIDTH}" height="{height}" fill="#fdfdf6"/>',
        f'<text x="{_WIDTH / 2}" y="18" text-anchor="middle" font-size="15">'
        f"{escape(title)}</text>",
        f'<text x="{_PAD}" y="36">total: {root.value:g} {unit}; hover a box for details; '
        f"root at the bottom, callees above callers</text>",
    ]
    if not root.value:
        parts.append(f'<text x="{_PAD}" y="{_HEADER + 12}">no samples were collected</text>')
    else:
        todo: list[tuple[_Node, float, int]] = [(root, float(_PAD), 0)]
        while todo:
            node, x, level = todo.pop()
            w = node.value * scale
            y = height - _PAD - (level + 1) * _ROW
            parts.append(_box(node, x=x, y=y, w=w, total=root.value, unit=unit))
            child_x = x
            for child in sorted(node.children.values(), key=lambda c: c.label):
                if child.value * scale >= _MIN_PX:
                    todo.append((child, child_x, level + 1))
                child_x += child.value * scale
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
