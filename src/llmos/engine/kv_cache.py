"""KV memory of one model: a pool of token cells, and a prefix cache (a radix tree of computed token paths).

Contract (engine thread only; pure Python over the backend's KV-span operations):

* **Prefix cache.** Every computed prompt (and every finished answer) can be kept: its tokens go into a radix tree
  with one root per namespace, ``(adapter, scope)``, so a prefix is reused only by requests of the same adapter
  and the same scope (the server's tenant, unless sharing is on); a model version has an engine, hence a cache, of
  its own. Each tree node is a span of positions ``[start, end)`` whose KV the backend keeps under a *holder*
  (:meth:`~llmos.engine.backends.base.Backend.save_span`). :meth:`PrefixCache.acquire` finds the longest cached
  prefix of a new sequence (leaving at least one token to compute, for its logits), loads it into the sequence's
  slot and locks the path; :meth:`PrefixCache.insert` adds what a sequence computed beyond the tree (its prompt when
  the prefill ends, its answer when it finishes); :meth:`PrefixCache.release` unlocks.
* **Eviction.** Unlocked leaves go least recently used first (:meth:`PrefixCache.evict_one`), when the tree is over
  its token capacity or out of holders, or when the pool needs room for running sequences: running sequences always
  win over cached prefixes. A locked path (some running sequence uses it) is never evicted.
* **One pool** (:class:`KvPool`, backends whose sequences and holders share one KV buffer, ``kv_shared_pool``):
  cells in use = tokens in the tree + each running sequence's private cells (those not shared with the tree). The
  scheduler asks :meth:`KvPool.free` before it adds tokens, evicts, and preempts when eviction is not enough.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol


class SpanBackend(Protocol):
    prefix_holders: int
    kv_shared_pool: bool
    kv_pool_tokens: int

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None: ...

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None: ...

    def split_span(self, holder: int, new_holder: int, at: int) -> None: ...

    def drop_span(self, holder: int) -> None: ...

    def drop_all_spans(self) -> None: ...


Namespace = tuple[str | None, str | None]
"""(adapter, scope): prefixes are shared only within one."""


@dataclass(eq=False)
class Node:
    tokens: list[int]
    start: int
    parent: Node | None
    holder: int | None = None
    children: dict[int, Node] = field(default_factory=dict)
    locks: int = 0
    last_used: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class CacheLease:
    """What one running sequence holds of the cache: the deepest node of its path it locks, and how many of its
    leading positions are cells of the tree (shared, not private)."""

    namespace: Namespace
    node: Node | None = None
    shared: int = 0
    hit: int = 0
    """Prompt tokens loaded from the cache when the sequence was admitted (reported as cached tokens)."""


class PrefixCache:
    def __init__(self, backend: SpanBackend, capacity_tokens: int) -> None:
        self.backend = backend
        self.capacity_tokens = capacity_tokens
        self.tokens = 0
        """Tokens held in the tree (cells of the pool, on a shared-pool backend)."""
        self._roots: dict[Namespace, Node] = {}
        self._free_holders = list(range(backend.prefix_holders - 1, -1, -1))
        backend.drop_all_spans()  # the tree starts empty, so must the holders (a backend may outlive an engine)
        self._clock = itertools.count(1)
        self.hit_tokens = 0
        self.miss_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.backend.prefix_holders > 0 and self.capacity_tokens > 0

    # --- lookup -----------------------------------------------------------------------------------------------------

    def _root(self, namespace: Namespace) -> Node:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = Node([], 0, None)
        return root

    def _walk(self, namespace: Namespace, tokens: list[int]) -> tuple[list[Node], int]:
        """The nodes along the longest cached prefix of ``tokens`` and its length (the last node may match only in
        part)."""
        node = self._root(namespace)
        path: list[Node] = []
        length = 0
        while length < len(tokens):
            child = node.children.get(tokens[length])
            if child is None:
                break
            common = _common_prefix(child.tokens, tokens, length)
            path.append(child)
            length += common
            if common < len(child.tokens):
                break
            node = child
        return path, length

    def acquire(self, namespace: Namespace, seq_id: int, tokens: list[int]) -> CacheLease:
        """Load the longest cached prefix of ``tokens`` (all but the last token at most) into ``seq_id``'s empty slot
        and lock it. The lease says how many tokens were loaded."""
        lease = CacheLease(namespace)
        if not self.enabled or len(tokens) < 2:
            return lease
        path, length = self._walk(namespace, tokens[:-1])
        if length == 0:
            return lease
        tick = next(self._clock)
        for node in path:
            end = min(node.end, length)
            assert node.holder is not None
            self.backend.load_span(node.holder, seq_id, node.start, end)
            node.last_used = tick
        lease.node = path[-1]
        lease.node.locks += 1
        lease.shared = lease.hit = length
        return lease

    def insert(self, lease: CacheLease, seq_id: int, tokens: list[int]) -> None:
        """Keep the KV of ``tokens`` (the sequence's cells at positions ``0..len(tokens)-1``) in the tree, adding
        what is not cached yet, and move the lease's lock to the node that ends the path."""
        if not self.enabled or not tokens:
            return
        path, length = self._walk(lease.namespace, tokens)
        tick = next(self._clock)
        for node in path:
            node.last_used = tick
        new_tokens = len(tokens) - length
        inside = bool(path) and length < path[-1].end  # the path ends part-way into its last node
        if new_tokens == 0 or (inside and not self._split(path[-1], length)):
            if path:
                self._lock(lease, path[-1])
            return
        if inside:  # the split node object is now the part after ``length``: attach beside it, to its new head
            parent = path[-1].parent
            assert parent is not None
        else:
            parent = path[-1] if path else self._root(lease.namespace)
        if self._make_room(new_tokens, keep=parent) and self._free_holders:
            holder = self._free_holders.pop()
            self.backend.save_span(holder, seq_id, length, len(tokens))
            node = Node(tokens[length:], length, parent, holder, last_used=tick)
            parent.children[node.tokens[0]] = node
            self.tokens += new_tokens
            lease.shared += new_tokens
            parent = node
        if parent.parent is not None:  # not a root
            self._lock(lease, parent)

    def release(self, lease: CacheLease) -> None:
        if lease.node is not None:
            lease.node.locks -= 1
            lease.node = None
        lease.shared = 0

    def _lock(self, lease: CacheLease, node: Node) -> None:
        if lease.node is node:
            return
        if lease.node is not None:
            lease.node.locks -= 1
        node.locks += 1
        lease.node = node

    def _split(self, node: Node, at: int) -> bool:
        """Cut ``node`` at position ``at``: a new head node [start, at) becomes its parent; the node object keeps
        [at, end), its children and its locks (a lease that locks it still covers its whole path). False when no
        holder can be freed for the new part."""
        assert node.start < at < node.end and node.parent is not None and node.holder is not None
        if not self._free_holders and not self.evict_one(keep=node):
            return False
        new_holder = self._free_holders.pop()
        self.backend.split_span(node.holder, new_holder, at)
        cut = at - node.start
        head = Node(node.tokens[:cut], node.start, node.parent, node.holder, last_used=node.last_used)
        node.parent.children[head.tokens[0]] = head
        node.tokens = node.tokens[cut:]
        node.start = at
        node.holder = new_holder
        node.parent = head
        head.children[node.tokens[0]] = node
        return True

    # --- eviction ---------------------------------------------------------------------------------------------------

    def _leaves(self) -> list[Node]:
        leaves: list[Node] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None and node.locks == 0:
                leaves.append(node)
        return leaves

    def evictable(self) -> bool:
        return bool(self._leaves())

    def evict_one(self, keep: Node | None = None) -> int:
        """Drop the least recently used unlocked leaf (never ``keep`` or its ancestors); returns the tokens freed."""
        protected = set()
        while keep is not None:
            protected.add(id(keep))
            keep = keep.parent
        leaves = [leaf for leaf in self._leaves() if id(leaf) not in protected]
        if not leaves:
            return 0
        victim = min(leaves, key=lambda n: n.last_used)
        assert victim.parent is not None and victim.holder is not None
        del victim.parent.children[victim.tokens[0]]
        self.backend.drop_span(victim.holder)
        self._free_holders.append(victim.holder)
        self.tokens -= len(victim.tokens)
        return len(victim.tokens)

    def _make_room(self, tokens: int, keep: Node | None) -> bool:
        """Evict until ``tokens`` more fit the tree's capacity and a holder is free; False when they cannot."""
        if tokens > self.capacity_tokens:
            return False
        while self.tokens + tokens > self.capacity_tokens or not self._free_holders:
            if not self.evict_one(keep):
                return False
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass


def _common_prefix(span: list[int], tokens: list[int], offset: int) -> int:
    limit = min(len(span), len(tokens) - offset)
    count = 0
    while count < limit and span[count] == tokens[offset + count]:
        count += 1
    return count


class KvPool:
    """Cells of a shared-pool backend: the tree's tokens plus each running sequence's private cells."""

    def __init__(self, capacity: int, cache: PrefixCache | None) -> None:
        self.capacity = capacity
        self.cache = cache

    def used(self, private: int) -> int:
        return private + (self.cache.tokens if self.cache is not None else 0)

    def free(self, private: int) -> int:
        return self.capacity - self.used(private)
