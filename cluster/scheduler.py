"""The scheduler: which tokens of which sequences each attention shard computes in the next step.

Pure Python (no torch, no Ray). Continuous batching: running sequences decode one token per step;
waiting ones are prefilled in chunks within a per-shard token budget; admission is bounded by free
cache blocks; when a running sequence needs a block and none is free, the most recently admitted
sequence of that shard is preempted (its blocks freed) and later recomputed from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.blocks import BlockAllocator


@dataclass
class SeqState:
    seq_id: int
    shard: int
    length: int  # tokens known (prompt + generated so far)
    max_length: int  # length it may reach (prompt + max new tokens)
    computed: int = 0  # tokens whose latents are in the cache
    preemptions: int = 0
    lookahead: int = 0  # positions past `length` worth holding blocks for (speculative drafts), when free
    drafts: int = 0  # draft tokens a decode chunk carries (they count against the token budget)


@dataclass(frozen=True)
class Chunk:
    seq_id: int
    start: int
    end: int
    sample: bool  # the chunk reaches the last known token: sample the next one
    block_table: tuple[int, ...] = ()


@dataclass
class ShardState:
    allocator: BlockAllocator
    waiting: deque = field(default_factory=deque)  # seq_ids, prefill not finished
    running: list = field(default_factory=list)  # seq_ids decoding, in admission order


class Scheduler:
    def __init__(self, num_shards: int, num_blocks: int, block_size: int, max_batch_tokens: int,
                 max_running: int = 64):
        self.shards = [ShardState(BlockAllocator(num_blocks, block_size)) for _ in range(num_shards)]
        self.block_size, self.max_batch_tokens, self.max_running = block_size, max_batch_tokens, max_running
        self.seqs: dict[int, SeqState] = {}
        self.num_preemptions = 0

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def add(self, seq_id: int, prompt_len: int, max_length: int, lookahead: int = 0, drafts: int = 0) -> int:
        """Admit a sequence to the queue of the shard with the most room; returns the shard."""
        capacity = self.shards[0].allocator.num_blocks
        if self.blocks_for(max_length) > capacity:
            raise ValueError(
                f"the request needs {self.blocks_for(max_length)} cache blocks (prompt + max_new_tokens = "
                f"{max_length} tokens) but a shard has {capacity}; lower max_new_tokens or add cache blocks"
            )

        def room(i):
            s = self.shards[i]
            pending = sum(self.blocks_for(self.seqs[q].length) for q in s.waiting)
            return (s.allocator.num_free - pending, -len(s.running) - len(s.waiting))

        shard = max(range(len(self.shards)), key=room)
        self.seqs[seq_id] = SeqState(seq_id, shard, prompt_len, max_length, lookahead=lookahead, drafts=drafts)
        self.shards[shard].waiting.append(seq_id)
        return shard

    def appended(self, seq_id: int) -> None:
        """The engine recorded a sampled token for ``seq_id``."""
        self.seqs[seq_id].length += 1

    def settle(self, seq_id: int) -> None:
        """The step's sampled tokens are recorded: every token but the last is now in the cache (a step
        may compute more than its chunk: kept drafts, or several model steps in one call)."""
        if seq_id in self.seqs:
            s = self.seqs[seq_id]
            s.computed = max(s.computed, s.length - 1)

    def _trim_ahead(self, shard: ShardState) -> None:
        """Every running sequence gives back the blocks it held past its length."""
        for seq_id in shard.running:
            shard.allocator.trim(seq_id, self.seqs[seq_id].length)

    def _grow_ahead(self, alloc: BlockAllocator, s: SeqState) -> None:
        """Room for speculative drafts and multi-step calls, only from free blocks: it is given back
        before anything is preempted or a waiting prompt is held back (``_trim_ahead``)."""
        if s.lookahead:
            want = min(s.length + s.lookahead, s.max_length + s.lookahead // 2)
            if alloc.can_grow(s.seq_id, want):
                alloc.grow(s.seq_id, want)

    def finish(self, seq_id: int) -> None:
        """Finished or cancelled: free its blocks and forget it."""
        s = self.seqs.pop(seq_id, None)
        if s is None:
            return
        shard = self.shards[s.shard]
        shard.allocator.free(seq_id)
        if seq_id in shard.waiting:
            shard.waiting.remove(seq_id)
        if seq_id in shard.running:
            shard.running.remove(seq_id)

    def requeue_all(self) -> None:
        """Every cache is gone (the data plane was rebuilt): all sequences wait to be recomputed, the
        running ones first, in their order."""
        for shard in self.shards:
            shard.allocator = BlockAllocator(shard.allocator.num_blocks, shard.allocator.block_size)
            shard.waiting = deque(shard.running + list(shard.waiting))
            shard.running = []
        for s in self.seqs.values():
            s.computed = 0

    def has_work(self) -> bool:
        return bool(self.seqs)

    def blocks_used(self, shard: int) -> int:
        a = self.shards[shard].allocator
        return a.num_blocks - a.num_free

    def schedule(self) -> list[list[Chunk]]:
        """The next step's chunks, per shard."""
        return [self._schedule_shard(i) for i in range(len(self.shards))]

    def _preempt(self, shard: ShardState) -> int:
        victim = shard.running.pop()
        s = self.seqs[victim]
        shard.allocator.free(victim)
        s.computed, s.preemptions = 0, s.preemptions + 1
        self.num_preemptions += 1
        shard.waiting.appendleft(victim)
        return victim

    def _schedule_shard(self, index: int) -> list[Chunk]:
        shard = self.shards[index]
        alloc = shard.allocator
        chunks: list[Chunk] = []
        budget = self.max_batch_tokens
        if shard.waiting:  # prompts waiting to start come before room held ahead for drafts
            self._trim_ahead(shard)
        # decode: one token each (plus its drafts), oldest first; preempt the newest when blocks run out
        scheduled: list[int] = []
        for seq_id in list(shard.running):
            if seq_id not in shard.running or budget <= 0:
                continue
            s = self.seqs[seq_id]
            if not alloc.can_grow(seq_id, s.length):
                self._trim_ahead(shard)
            while not alloc.can_grow(seq_id, s.length) and shard.running:
                if self._preempt(shard) == seq_id:
                    break
            if seq_id not in shard.running:
                continue
            alloc.grow(seq_id, s.length)
            scheduled.append(seq_id)
            budget -= 1 + s.drafts
        for seq_id in scheduled:
            s = self.seqs[seq_id]
            if not shard.waiting:
                self._grow_ahead(alloc, s)
            chunks.append(Chunk(seq_id, s.computed, s.length, True, tuple(alloc.tables[seq_id])))
        # prefill: waiting sequences in order, admitted only when the blocks for all their known tokens
        # are free; chunked by the token budget
        while shard.waiting and budget > 0 and len(shard.running) < self.max_running:
            seq_id = shard.waiting[0]
            s = self.seqs[seq_id]
            if not alloc.can_grow(seq_id, s.length):
                break
            alloc.grow(seq_id, s.length)
            end = min(s.length, s.computed + budget)
            chunks.append(Chunk(seq_id, s.computed, end, end == s.length, tuple(alloc.tables[seq_id])))
            budget -= end - s.computed
            if end == s.length:
                shard.waiting.popleft()
                shard.running.append(seq_id)
            else:
                break  # budget or blocks exhausted mid-prompt: the rest next step
        return chunks

    def computed(self, chunks: list[list[Chunk]]) -> None:
        """The step ran: the chunks' tokens are now in the cache."""
        for shard_chunks in chunks:
            for c in shard_chunks:
                if c.seq_id in self.seqs:
                    self.seqs[c.seq_id].computed = c.end
