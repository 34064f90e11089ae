"""Token-wise automatic prefix caching (XY-Serve §5.1.1): a radix tree over token ids whose nodes own KV blocks.

KV lives in blocks, but reuse is token-granular. ``match`` returns the longest cached prefix in tokens with the
blocks that hold it, the last one partial when the prefix ends inside a block (its real token count is the
prefix length modulo the block size); the scheduler shares the full blocks and copies the partial one on write,
so the request extends its copy without disturbing the other owners. ``insert`` caches a request's computed
tokens (after prefill chunks and when it ends), so later requests and later turns of a conversation hit them.

A node holds a run of tokens at positions ``start .. end - 1`` of its path and owns the blocks of its block
indices ``start // block_size ..``: block ``j`` of a node holds the KV of every path position of block ``j`` up to
the node's end (a node that forks inside its parent's last block owns a copy of that block). A node with children
that ends inside a block leaves that block to its children: any child's block holds its tokens too, so no block
is ever shadowed. Every cached block has one owner node; the cache owns one reference (``BlockManager.refcount``)
on each. ``evict`` drops least recently used leaves none of whose blocks a request holds, so a running request,
which owns every block of its table, is never disturbed by eviction.
"""

from __future__ import annotations

import heapq
import itertools

from xyjax.engine.block_manager import BlockManager


class Node:
    __slots__ = ("tokens", "start", "blocks", "parent", "children", "last_access")

    def __init__(self, tokens: list[int], start: int, blocks: list[int], parent: "Node | None", last_access: int):
        self.tokens, self.start, self.blocks, self.parent = tokens, start, blocks, parent
        self.children: dict[int, Node] = {}   # keyed by the child's first token
        self.last_access = last_access


class PrefixCache:
    """The radix tree over the engine's ``BlockManager``."""

    def __init__(self, blocks: BlockManager):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.root = Node([], 0, [], None, 0)
        self.cached: set[int] = set()          # blocks owned by nodes
        self._clock = itertools.count(1)

    @property
    def num_idle_blocks(self) -> int:
        """Cached blocks no request holds."""
        return sum(self.blocks.refcount[b] == 1 for b in self.cached)

    def match(self, tokens: list[int]) -> tuple[int, list[int]]:
        """The longest cached prefix of ``tokens``: its length in tokens and the ceil(length / block_size)
        blocks holding it (owned by the cache: share them to use them). Marks the path recently used; a match
        ending inside a node splits it there."""
        bs, now = self.block_size, next(self._clock)
        node, pos, table = self.root, 0, []
        while pos < len(tokens) and tokens[pos] in node.children:
            node = node.children[tokens[pos]]
            n = _common(node.tokens, tokens, pos)
            inside = n < len(node.tokens)
            if inside:                         # the rest becomes a leaf, which eviction frees while this prefix is used
                node = self._split(node, n)
            node.last_access = now
            first = node.start // bs
            table[first:] = node.blocks[:(pos + n - 1) // bs - first + 1]
            pos += n
            if inside:
                break
        if len(table) * bs < pos:              # the match ends in a block the node leaves to its children
            node = next(iter(node.children.values()))
            while not node.blocks:
                node = next(iter(node.children.values()))
            table.append(node.blocks[0])
        return pos, table

    def insert(self, tokens: list[int], table: list[int]) -> None:
        """Cache ``tokens``, whose KV is in ``table`` (block ``i`` holds positions ``i * block_size ..``).
        Cached tokens keep their blocks; the rest becomes a new leaf owning the table's blocks."""
        bs, now = self.block_size, next(self._clock)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                if pos % bs and not node.children:   # the leaf's first block will hold the node's last tokens
                    self._release(node.blocks.pop())
                leaf = Node(tokens[pos:], pos, table[pos // bs:(len(tokens) - 1) // bs + 1], node, now)
                for block in leaf.blocks:
                    self._hold(block)
                node.children[tokens[pos]] = leaf
                return
            n = _common(child.tokens, tokens, pos)
            child.last_access = now
            if n < len(child.tokens) and pos + n < len(tokens):
                child = self._split(child, n)
            self._adopt(child, table, pos + n)
            node, pos = child, pos + n

    def _adopt(self, node: Node, table: list[int], end: int) -> None:
        """Let ``node`` own the blocks of ``table`` that hold the same tokens as its own in full (positions below
        ``end``): a request that computed a cached prefix without sharing it (one scoring its prompt) caches what
        follows below it, and a node above blocks a request holds must hold them too, or eviction (leaves first)
        could not free it while the request runs."""
        first = node.start // self.block_size
        for k, block in enumerate(node.blocks):
            if (first + k + 1) * self.block_size > end:
                break
            mine = table[first + k]
            if mine != block:
                self._release(block)
                self._hold(mine)
                node.blocks[k] = mine

    def evict(self, num_blocks: int) -> int:
        """Drop least recently used leaves no request holds a block of until ``num_blocks`` blocks are back in
        the pool or none is left; returns the blocks given back."""
        tick = itertools.count()
        heap = [(n.last_access, next(tick), n) for n in self._nodes() if not n.children and self._idle(n)]
        heapq.heapify(heap)
        start = self.blocks.num_free
        while heap and self.blocks.num_free - start < num_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.tokens[0]]
            if node.start % self.block_size and not parent.children:   # the parent's last block comes back to it
                parent.blocks.append(node.blocks.pop(0))
            for block in node.blocks:
                self._release(block)
            if parent is not self.root and not parent.children and self._idle(parent):
                heapq.heappush(heap, (parent.last_access, next(tick), parent))
        return self.blocks.num_free - start

    def _split(self, node: Node, n: int) -> Node:
        """Cut ``node`` after its first ``n`` tokens; returns the new upper half (the parent of ``node``). The
        block the cut falls in stays with the lower half."""
        cut = node.start + n
        k = cut // self.block_size - node.start // self.block_size
        upper = Node(node.tokens[:n], node.start, node.blocks[:k], node.parent, node.last_access)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.start, node.blocks, node.parent = node.tokens[n:], cut, node.blocks[k:], upper
        upper.children[node.tokens[0]] = node
        return upper

    def _idle(self, node: Node) -> bool:
        return all(self.blocks.refcount[b] == 1 for b in node.blocks)

    def _hold(self, block: int) -> None:
        self.blocks.ref(block)
        self.cached.add(block)

    def _release(self, block: int) -> None:
        self.cached.remove(block)
        self.blocks.unref(block)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node


def _common(run: list[int], tokens: list[int], pos: int) -> int:
    """How many leading tokens of ``run`` equal ``tokens[pos:]``."""
    n = min(len(run), len(tokens) - pos)
    if run[:n] == tokens[pos:pos + n]:
        return n
    return next(i for i in range(n) if run[i] != tokens[pos + i])
