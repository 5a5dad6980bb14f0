"""The scheduler alone: no Ray, no torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.scheduler import Scheduler


def _run_step(s: Scheduler, sampled_tokens=True):
    chunks = s.schedule()
    s.computed(chunks)
    for shard in chunks:
        for c in shard:
            if c.sample and sampled_tokens:
                s.appended(c.seq_id)
    return chunks


def test_scheduler_imports_without_torch():
    """The scheduler and block accounting load in a fresh interpreter without importing torch."""
    code = "import sys, cluster.scheduler, model.blocks; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_admission_and_chunked_prefill():
    s = Scheduler(num_shards=1, num_blocks=64, block_size=4, max_batch_tokens=10)
    s.add(0, prompt_len=23, max_length=30)
    s.add(1, prompt_len=3, max_length=10)
    steps = [_run_step(s)[0] for _ in range(4)]
    assert [(c.seq_id, c.start, c.end, c.sample) for c in steps[0]] == [(0, 0, 10, False)]
    assert [(c.seq_id, c.start, c.end, c.sample) for c in steps[1]] == [(0, 10, 20, False)]
    # seq 0 finishes its prompt (3 tokens, samples), seq 1 is admitted with the rest of the budget
    assert [(c.seq_id, c.start, c.end, c.sample) for c in steps[2]] == [(0, 20, 23, True), (1, 0, 3, True)]
    assert [(c.seq_id, c.start, c.end, c.sample) for c in steps[3]] == [(0, 23, 24, True), (1, 3, 4, True)]
    table = steps[3][0].block_table
    assert len(table) == 6 and len(set(table)) == 6  # 24 tokens / 4 per block, all distinct


def test_shard_assignment_balances():
    s = Scheduler(num_shards=2, num_blocks=16, block_size=4, max_batch_tokens=64)
    shards = [s.add(i, prompt_len=8, max_length=12) for i in range(4)]
    assert sorted(shards) == [0, 0, 1, 1]


def test_preemption_and_resumption():
    s = Scheduler(num_shards=1, num_blocks=4, block_size=4, max_batch_tokens=64)
    s.add(0, prompt_len=7, max_length=16)
    s.add(1, prompt_len=7, max_length=16)
    _run_step(s)  # both prefilled: 2 blocks each, all 4 used; lengths now 8 and 8
    chunks = _run_step(s)[0]  # both fit position 7 in their second block
    assert [c.seq_id for c in chunks] == [0, 1]
    chunks = _run_step(s)[0]  # both need a third block: seq 1 (newest) is preempted
    assert [c.seq_id for c in chunks] == [0] and s.num_preemptions == 1
    assert s.seqs[1].computed == 0 and s.blocks_used(0) == 3
    s.finish(0)
    chunks = _run_step(s)[0]  # seq 1 recomputes its whole history (7 + 2 sampled tokens) and samples
    assert [(c.seq_id, c.start, c.end, c.sample) for c in chunks] == [(1, 0, 9, True)]


def test_finish_frees_blocks():
    s = Scheduler(num_shards=1, num_blocks=8, block_size=4, max_batch_tokens=64)
    s.add(0, prompt_len=9, max_length=12)
    _run_step(s)
    assert s.blocks_used(0) == 3
    s.finish(0)
    assert s.blocks_used(0) == 0 and not s.has_work()


def test_request_larger_than_a_shard_is_rejected():
    s = Scheduler(num_shards=1, num_blocks=2, block_size=4, max_batch_tokens=64)
    with pytest.raises(ValueError, match="cache blocks"):
        s.add(0, prompt_len=5, max_length=20)


def _two_holding_room():
    """Two running sequences; the first holds 2 blocks past its length, no block is free."""
    s = Scheduler(num_shards=1, num_blocks=6, block_size=4, max_batch_tokens=64)
    s.add(0, prompt_len=4, max_length=20, lookahead=8, drafts=2)
    s.add(1, prompt_len=4, max_length=20, lookahead=8, drafts=2)
    _run_step(s)  # both prefilled (one block each), each samples
    a, b = _run_step(s)[0]  # decode: room ahead from the free blocks, oldest first
    assert {c.seq_id: len(c.block_table) for c in (a, b)} == {0: 4, 1: 2}
    assert s.shards[0].allocator.num_free == 0
    return s


def test_room_held_for_drafts_is_given_back_before_preempting():
    """Blocks held past a sequence's length (for drafts) come from free blocks only: they are given
    back when another running sequence needs a block, and never cause a preemption."""
    s = _two_holding_room()
    for _ in range(4):  # sequence 1 outgrows its two blocks: sequence 0's room ahead is trimmed instead
        _run_step(s)
    tables = s.shards[0].allocator.tables
    assert s.num_preemptions == 0 and len(tables[0]) == len(tables[1]) == 3
    assert s.seqs[1].length == 10 and s.seqs[1].computed == 9


def test_room_held_for_drafts_is_given_back_to_a_waiting_prompt():
    s = _two_holding_room()
    s.add(2, prompt_len=4, max_length=8)
    chunks = _run_step(s)[0]
    assert [(c.seq_id, c.sample) for c in chunks] == [(0, True), (1, True), (2, True)]
    assert s.num_preemptions == 0 and len(s.shards[0].allocator.tables[0]) == 2


def test_drafts_count_against_the_token_budget():
    s = Scheduler(num_shards=1, num_blocks=64, block_size=4, max_batch_tokens=7)
    for i in range(4):
        s.add(i, prompt_len=1, max_length=20, drafts=2)
    _run_step(s)  # all four prefilled (1 token each)
    decode = _run_step(s)[0]
    assert len(decode) == 3  # 3 x (1 + 2 drafts) = 9 >= 7: the fourth waits for the next step
