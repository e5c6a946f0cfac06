"""The router's guess at a worker's cache: a radix tree over the text sent to that worker.

The router does not see the workers' token-level radix caches; it keeps, per worker, a character-level tree of
the request texts it routed there (or, with `--tree-source events`, of the prefixes the worker reports it cached).
A long match means the worker most likely still holds that prefix's KV. The tree is bounded: `evict` drops the
least recently matched leaves until it holds at most `max_size` characters, as the worker's own cache drops its
least recently used KV.
"""

from __future__ import annotations

import heapq
import itertools
import time


class _Node:
    __slots__ = ("children", "parent", "label", "last_access")

    def __init__(self, parent: _Node | None, label: str):
        self.children: dict[str, _Node] = {}  # keyed by the first character of the child's label
        self.parent = parent
        self.label = label
        self.last_access = time.monotonic()


class PrefixTree:
    """Insert texts, find the longest stored prefix of a text, evict least recently used leaves."""

    def __init__(self):
        self.root = _Node(None, "")
        self.size = 0  # characters stored (the sum of the labels)

    def match(self, text: str) -> int:
        """Length of the longest prefix of `text` in the tree; the nodes on its path count as used now."""
        node, pos, now = self.root, 0, time.monotonic()
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            common = _common_prefix(child.label, text, pos)
            child.last_access = now
            pos += common
            if common < len(child.label):
                break
            node = child
        return pos

    def insert(self, text: str) -> None:
        node, pos, now = self.root, 0, time.monotonic()
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(node, text[pos:])
                node.children[text[pos]] = leaf
                self.size += len(leaf.label)
                return
            common = _common_prefix(child.label, text, pos)
            child.last_access = now
            if common < len(child.label):
                child = _split(child, common)
            node, pos = child, pos + common

    def evict(self, max_size: int) -> int:
        """Drop least recently used leaves until at most `max_size` characters remain; returns how many went."""
        if self.size <= max_size:
            return 0
        before = self.size
        order = itertools.count()  # ties in last_access must not compare nodes
        leaves = [(n.last_access, next(order), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while self.size > max_size and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.label[0]]
            self.size -= len(leaf.label)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_access, next(order), parent))
        return before - self.size

    def remove(self, text: str) -> int:
        """Drop what the tree holds of `text` beyond the part it shares with other stored texts (a prefix the
        worker reports evicted). Returns the characters removed."""
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None or _common_prefix(child.label, text, pos) < len(child.label):
                return 0
            node, pos = child, pos + len(child.label)
        removed = 0
        while node is not self.root and not node.children:
            parent = node.parent
            del parent.children[node.label[0]]
            self.size -= len(node.label)
            removed += len(node.label)
            node = parent
        return removed

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


def _common_prefix(label: str, text: str, start: int) -> int:
    """Characters `label` shares with `text[start:]`, from their beginnings."""
    limit = min(len(label), len(text) - start)
    i = 0
    while i < limit and label[i] == text[start + i]:
        i += 1
    return i


def _split(node: _Node, at: int) -> _Node:
    """Cut `node`'s label after `at` characters; returns the new upper node (which keeps node's place)."""
    parent = node.parent
    upper = _Node(parent, node.label[:at])
    upper.last_access = node.last_access
    parent.children[upper.label[0]] = upper
    node.label = node.label[at:]
    node.parent = upper
    upper.children[node.label[0]] = node
    return upper
