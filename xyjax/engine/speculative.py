"""Speculative decoding: the engine option, per-request adaptive control, acceptance and rejection sampling.

Flow (XY-Serve §4.1, §5.1.2). Before a step the engine asks the drafter (xyjax.engine.drafters) for a draft of
every running request that is decoding; the pending token and its draft nodes enter the step as one V run
under the token budget: a chain keeps the causal mask, a tree gets TREE attention tasks with the ancestor
mask (xyjax.ops.attention.tiling). Node j sits at position ``start + depth(j)`` (RoPE) and writes its KV at slot
``start + j``. The step samples every row of the run in its one jitted sampler call; row j's token is
drawn with the request's key ``(seed, outputs so far + depth(j))``, as plain decoding would draw it.

Acceptance (host, ``accepted_path``): from the root, follow the child whose token equals the token
sampled at the current node; the path's sampled tokens are the output (accepted drafts, then the token
sampled where no child matched: the correction or bonus token). For a deterministic drafter (q a point
mass on the draft d) this *is* rejection sampling: the draft is kept with probability p(d) = min(1, p/q),
and otherwise the sampled token is distributed as p without d, renormalised, which is the residual
max(p - q, 0) / Z. Greedy (argmax) is the temperature-0 case. Because the draws use plain decoding's
keys, a seeded request gives the same tokens with and without speculation.

Rollback: the KV of rejected nodes is dead; ``num_computed`` goes back to the accepted length so those
slots are overwritten before anything reads them. A tree's accepted nodes may sit at slots past their
final position; ``kv_moves`` lists the (src, dst) slot copies that the runner applies (one jitted program
of fixed shape, all reads before all writes) right after the step, before any token is appended, so a
request that finishes there hands the prefix cache correct KV.
"""

from __future__ import annotations

import dataclasses
import math


from xyjax.engine.drafters import DraftTree, NgramDrafter


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """The ``speculative`` engine option: method "ngram" (prompt lookup); num_draft_tokens: draft nodes per
    step (chain length, or the tree's node budget); tree: merge several matches into a token tree;
    min_n/max_n: suffix lengths searched; max_matches: continuations merged into a tree; adaptive: drop
    drafting for requests whose drafts are rarely accepted (``AdaptiveControl``)."""

    method: str = "ngram"
    num_draft_tokens: int = 6
    tree: bool = False
    min_n: int = 2
    max_n: int = 4
    max_matches: int = 3
    adaptive: bool = True

    @classmethod
    def parse(cls, option: dict | None) -> "SpecConfig | None":
        if option is None:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(option, dict) or set(option) - known:
            raise ValueError(f"engine option speculative must be a dict with keys among {sorted(known)}, "
                             f"got {option!r}")
        spec = cls(**option)
        if spec.method != "ngram":
            raise ValueError(f"speculative method {spec.method!r} is not available; known: ngram")
        if not isinstance(spec.num_draft_tokens, int) or spec.num_draft_tokens < 1:
            raise ValueError(f"speculative num_draft_tokens must be an integer >= 1, got {spec.num_draft_tokens!r}")
        return spec

    def drafter(self) -> NgramDrafter:
        return NgramDrafter(self.min_n, self.max_n, tree=self.tree, max_matches=self.max_matches)


@dataclasses.dataclass
class AdaptiveControl:
    """Per-request draft length from an EMA of its accepted drafts per verify run (start it at k).

    The next draft gets ``ceil(ema) + slack`` nodes (at most k): a request that copies text drafts the whole
    budget, one whose drafts fail drafts less and less, since every rejected token costs compute. Below
    ``min_accepted`` drafting pauses for ``pause`` steps (8, doubling on every failed re-probe up to 256),
    then re-probes with 1 + slack drafts; a probe with an accepted draft ends the backoff. Random text thus
    costs a few short drafts and then a probe now and then. slack 2: on the CPU a verify row costs about 7%
    of a decode step (the weights are streamed once for all rows), so two drafts past the expected accepted
    run pay for themselves (slack 1 measured 1.48x, slack 2 1.54x at batch 1, two runs each)."""

    ema: float
    paused: int = 0
    pause: int = 0
    alpha: float = 0.5
    min_accepted: float = 0.2
    slack: int = 2

    def budget(self, k: int) -> int:
        if self.paused:
            self.paused -= 1
            return 0
        return max(1, min(k, math.ceil(self.ema) + self.slack))

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.ema += self.alpha * (accepted - self.ema)
        if self.ema < self.min_accepted or (self.pause and not accepted):     # failing, or a failed re-probe
            self.pause = min(2 * self.pause or 8, 256)
            self.paused, self.ema = self.pause, 1.0
        elif accepted:
            self.pause = 0


def accepted_path(tree: DraftTree, sampled: list[int]) -> list[int]:
    """Rows of the accepted path, root (row 0) first; node j is row j + 1. ``sampled`` [1 + n]: the token
    sampled at each row. The output tokens are ``sampled[row]`` for the path's rows."""
    path = [0]
    while True:
        want, parent = sampled[path[-1]], path[-1] - 1
        child = next((j + 1 for j, (p, t) in enumerate(zip(tree.parents, tree.tokens))
                      if p == parent and t == want), None)
        if child is None:
            return path
        path.append(child)


def kv_moves(path: list[int], start: int, slot) -> list[tuple[int, int]]:
    """(src, dst) slot copies that put the accepted path's KV at positions start + depth. ``slot(pos)``
    maps a position of the request to its KV slot; the tree wrote row r at position ``start + r``."""
    return [(slot(start + row), slot(start + depth)) for depth, row in enumerate(path) if row != depth]
