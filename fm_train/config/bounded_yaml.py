"""YAML for run configs with bounds that hostile input cannot get past.

``yaml.safe_load`` runs no code, but a few hundred bytes of nested aliases (a "billion laughs"
document) expand to billions of values once anything walks them, a self-referencing alias makes a
cycle, and deep nesting ends in a ``RecursionError``. This loader refuses each before it costs time:
the document's size is checked before parsing, nesting depth while composing, and every node's
expanded size (what it would be with aliases copied out) as soon as the node is complete.
A real run config is a few hundred nodes, five levels deep and a few kilobytes.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.error import Mark
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 50_000
MAX_REPR = 80


class YamlBoundError(ValueError):
    """A YAML document that is too large, too deep, cyclic or not valid; the message is one line."""


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start ending in "..."."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters, without walking more of ``value`` than it shows."""
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = shorten.maxlong = limit
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = shorten.maxset = 6
    shorten.maxlevel = 3
    try:
        text = shorten.repr(value)
    except ValueError:  # an int beyond Python's str conversion limit
        text = f"<a number of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable>"
    return cut(text, limit)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds nesting depth and the expanded size of every node, refuses cycles."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()
        self._expanded: dict[int, int] = {}  # id(node) -> node count with aliases copied out

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):
            anchor = self.peek_event().anchor
            if anchor in self._open_anchors:
                mark = self.peek_event().start_mark
                raise _refuse(f"alias *{cut(anchor, 40)} refers to a node that contains it (a cycle)", mark)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _refuse(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        anchor = self.peek_event().anchor
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)
        self._weigh(node)
        return node

    def _weigh(self, node: Node) -> None:
        """Record ``node``'s expanded size (its children are complete, so theirs are known)."""
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._expanded[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._expanded[id(k)] + self._expanded[id(v)] for k, v in node.value)
        if size > MAX_NODES:
            raise _refuse(f"expands to more than {MAX_NODES:,} values (aliases of aliases?)", node.start_mark)
        self._expanded[id(node)] = size



def _refuse(problem: str, mark: Mark | None) -> YamlBoundError:
    return YamlBoundError(problem + _where(mark))


def _where(mark: Mark | None) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _one_line(exc: yaml.YAMLError) -> str:
    """A PyYAML error as one short line: its problem and position, without the quoted snippet."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        context = f"{exc.context}: " if exc.context else ""
        text = f"{context}{exc.problem}{_where(exc.problem_mark)}"
    else:
        text = str(exc)
    return cut(" ".join(text.split()), 200)


def load_yaml_text(text: str) -> Any:
    """Parse one YAML document within the bounds; raise :class:`YamlBoundError` with a one-line reason."""
    if len(text) > MAX_BYTES:
        raise YamlBoundError(f"{len(text):,} characters, more than the {MAX_BYTES:,} a config may have")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except YamlBoundError:
        raise
    except yaml.YAMLError as exc:
        raise YamlBoundError(f"not valid YAML: {_one_line(exc)}") from None
    except (ValueError, OverflowError) as exc:  # the constructor's int()/date() on absurd scalars
        raise YamlBoundError(f"not valid YAML: a value cannot be read ({short_repr(str(exc), 120)})") from None
    except RecursionError:  # the depth bound should come first; this keeps a traceback out regardless
        raise YamlBoundError("not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Path) -> Any:
    """Read and parse ``path`` within the bounds; the size is checked before a byte is parsed."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlBoundError(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise YamlBoundError(f"larger than the {MAX_BYTES:,} bytes a config may have; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlBoundError(f"not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return load_yaml_text(text)
