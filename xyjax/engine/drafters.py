"""Drafters (host, numpy): propose speculative tokens for a request to verify in its next V run.

A proposal is a ``DraftTree`` of nodes that follow the request's pending token (the last of
``token_ids``, the tree's root): ``tokens[j]`` is node j's token and ``parents[j]`` its parent node (-1:
the root), parents first. A chain of k drafts is the tree with ``parents = [-1, 0, 1, ..., k - 2]``.
Siblings carry distinct tokens, so the target's one sampled token picks at most one child.

``NgramDrafter`` is prompt lookup: the request's last n tokens (n from ``max_n`` down to ``min_n``) are
searched for earlier in its own tokens, and what followed the match is the draft. As a chain it takes the
most recent match of the longest n; as a tree (``tree=True``) it merges the continuations of several
matches (best first, each cut to ``max_nodes - 2 (matches - 1)`` tokens, so the best keeps most of the
budget and the others branch off it) into one token trie of at most ``max_nodes`` nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class DraftTree:
    """tokens [n] and parents [n] (topological, -1 = root), from a deterministic drafter (q a point mass)."""

    tokens: list[int]
    parents: list[int]

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))

    def depths(self) -> list[int]:
        """Depth of every node (the root's children: 1)."""
        depth = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth


class Drafter(Protocol):
    def propose(self, token_ids: list[int], max_nodes: int) -> DraftTree:
        """A draft of at most ``max_nodes`` nodes following ``token_ids`` (possibly empty)."""


class NgramDrafter:
    """Prompt-lookup drafting from a request's own tokens (see the module docstring)."""

    def __init__(self, min_n: int = 1, max_n: int = 4, tree: bool = False, max_matches: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.tree, self.max_matches = min_n, max_n, tree, max_matches

    def matches(self, token_ids: list[int]) -> list[int]:
        """Start of the continuation after each earlier occurrence of the request's suffix: longest suffix
        (n) first, most recent first within one n, distinct starts, at most ``max_matches``."""
        ids = np.asarray(token_ids)
        last = len(ids) - 1
        ends = np.flatnonzero(ids[:-1] == ids[-1])[::-1]        # earlier occurrences of the last token
        found, seen = [], set()
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            for i in range(1, n):                                # the n-1 tokens before must match too
                cand = cand[ids[cand - i] == ids[last - i]]
            for end in cand.tolist():
                if end + 1 not in seen:
                    seen.add(end + 1)
                    found.append(end + 1)
            if len(found) >= (self.max_matches if self.tree else 1):
                break
        return found[:self.max_matches if self.tree else 1]

    def propose(self, token_ids: list[int], max_nodes: int) -> DraftTree:
        starts = self.matches(token_ids) if max_nodes > 0 else []
        if not self.tree:
            return DraftTree.chain(token_ids[starts[0]:starts[0] + max_nodes] if starts else [])
        tokens, parents, children = [], [], {}                  # trie: (parent, token) -> node
        depth = max(1, max_nodes - 2 * (len(starts) - 1))      # leave each other match about 2 nodes
        for start in starts:
            parent = -1
            for token in token_ids[start:start + depth]:
                node = children.get((parent, token))
                if node is None:
                    if len(tokens) == max_nodes:
                        break
                    node = children[(parent, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                parent = node
        return DraftTree(tokens, parents)
