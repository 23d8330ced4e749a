"""Continuous batching without a model: who runs, in what order, and preemption."""

from services.decode.scheduler import Scheduler
from services.decode.sequence import Finish, Sequence, StopRules
from services.engine.block_hash import hash_blocks
from services.engine.block_manager import BlockManager
from services.request_params import SamplingParams

EOS = 2


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    # A sequence as decode receives it: prompt plus the first token sampled by prefill.
    return Sequence(
        request_id=request_id,
        token_ids=list(range(10, 10 + prompt_len)) + [5],
        num_prompt_tokens=prompt_len,
        sampling=SamplingParams(temperature=0.0),
        stop=StopRules(max_tokens=max_tokens, max_model_len=1000, eos_token_ids=frozenset({EOS})),
    )


def pulled(blocks: BlockManager, seq: Sequence) -> Sequence:
    """Gives the sequence the blocks its prompt's KV was pulled into."""
    seq.block_table = blocks.allocate(-(-seq.num_prompt_tokens // blocks.block_size))
    seq.num_cached = seq.num_prompt_tokens
    return seq


def test_requests_join_at_step_boundaries_and_share_one_step():
    blocks = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64)
    a = pulled(blocks, make_seq("a", 4))
    scheduler.add(a)
    step = scheduler.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step] == [("a", 1)]
    # Position 4 starts a new block: the step reserved it.
    assert a.block_table == [0, 1]
    scheduler.postprocess(step, [[7]])
    b = pulled(blocks, make_seq("b", 3))
    scheduler.add(b)
    step = scheduler.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step] == [("a", 1), ("b", 1)]
    assert all(s.samples for s in step)


def test_finish_on_eos_max_tokens_and_release_blocks():
    blocks = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64)
    a = pulled(blocks, make_seq("a", 4))
    b = pulled(blocks, make_seq("b", 4, max_tokens=2))
    scheduler.add(a)
    scheduler.add(b)
    outputs = scheduler.postprocess(scheduler.schedule(), [[EOS], [9]])
    assert [(seq.request_id, tok, fin) for seq, tok, fin in outputs] == [
        ("a", EOS, Finish.STOP),
        ("b", 9, Finish.LENGTH),
    ]
    assert not scheduler.running
    assert blocks.num_free_blocks == 16


def test_batch_size_limit_keeps_the_rest_waiting():
    blocks = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=2, max_step_tokens=64)
    for name in "abc":
        scheduler.add(pulled(blocks, make_seq(name, 2)))
    assert [s.seq.request_id for s in scheduler.schedule()] == ["a", "b"]
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_full_pool_preempts_the_newest_and_recomputes_it_in_chunks():
    blocks = BlockManager(num_blocks=5, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=3)
    a = pulled(blocks, make_seq("a", 4))  # block [0]
    b = pulled(blocks, make_seq("b", 7))  # blocks [1, 2]
    scheduler.add(a)
    scheduler.add(b)
    steps = []
    while scheduler.num_preemptions == 0:
        step = scheduler.schedule()
        steps.append([s.seq.request_id for s in step])
        scheduler.postprocess(step, [[7]] * sum(s.samples for s in step))
    # a and b share steps until a's 9th token needs a third block: b, the newest, yields.
    assert steps[:-1] == [["a", "b"]] * 4 and steps[-1] == ["a"]
    assert a.block_table == [0, 3, 1]  # b freed [1, 2, 4] tail first: 1 is reused first
    assert b.block_table == [] and b.num_cached == 0
    assert [s.request_id for s in scheduler.waiting] == ["b"]
    # Once a finishes, b is recomputed from scratch under the 3-token budget, then samples.
    a.stop.max_tokens = a.num_generated + 1
    scheduler.postprocess(scheduler.schedule(), [[7]])
    assert not scheduler.running or scheduler.running[0] is b
    chunks = []
    while True:
        step = scheduler.schedule()
        assert [s.seq.request_id for s in step] == ["b"]
        chunks.append(step[0].num_tokens)
        if step[0].samples:
            break
        scheduler.postprocess(step, [])
    assert chunks[:-1] == [3] * (len(chunks) - 1) and sum(chunks) == len(b.token_ids)


def test_abort_frees_blocks_of_running_and_waiting():
    blocks = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=1, max_step_tokens=64)
    scheduler.add(pulled(blocks, make_seq("a", 4)))
    scheduler.add(pulled(blocks, make_seq("b", 4)))
    scheduler.schedule()
    assert scheduler.abort("b").finish is Finish.ABORT
    assert scheduler.abort("a").finish is Finish.ABORT
    assert scheduler.abort("missing") is None
    assert blocks.num_free_blocks == 8


# Decode's defaults: 65,536 tokens of KV in 16-token blocks, 64 sequences, 2,048 tokens a step.
DEFAULT_BLOCKS, DEFAULT_BLOCK_SIZE, DEFAULT_BATCH, DEFAULT_STEP_TOKENS = 4096, 16, 64, 2048


def distinct_seq(index: int, prompt_len: int, max_tokens: int) -> Sequence:
    seq = make_seq(f"r{index}", prompt_len, max_tokens)
    seq.token_ids = [100_000 * (index + 1) + t for t in range(prompt_len)] + [5]
    seq.stop.max_model_len = 8192
    return seq


def run_to_completion(scheduler: Scheduler, pending: list[Sequence], max_steps: int) -> int:
    """Steps like the decode engine, pulling the pending sequences' KV as `KvPuller` does
    (each tries every step, in arrival order); returns the steps taken until all finished."""
    done = 0
    for step_index in range(max_steps):
        for seq in list(pending):
            blocks = scheduler.begin_pull([], seq.token_ids[: seq.num_prompt_tokens], 63)
            if blocks is None:
                continue
            reused, new = blocks
            seq.block_table, seq.num_cached = reused + new, seq.num_prompt_tokens
            scheduler.end_pull(seq)
            pending.remove(seq)
        step = scheduler.schedule()
        assert step or not (scheduler.running or scheduler.waiting), f"jammed at {step_index}"
        outputs = scheduler.postprocess(step, [[7]] * sum(s.samples for s in step))
        done += sum(finish is not None for _, _, finish in outputs)
        if not pending and not scheduler.running and not scheduler.waiting:
            return step_index + 1
    raise AssertionError(f"{done} finished after {max_steps} steps")


def test_two_hundred_long_prompts_never_jam_the_default_pool():
    """200 prompts of 1,000 tokens, 200 tokens each: 64 running sequences need 4,800 blocks of
    the 4,096, so the pool runs dry, yet every request finishes and waiting ones hold little."""
    blocks = BlockManager(DEFAULT_BLOCKS, DEFAULT_BLOCK_SIZE)
    scheduler = Scheduler(blocks, DEFAULT_BATCH, DEFAULT_STEP_TOKENS)
    pending = [distinct_seq(i, 1000, max_tokens=200) for i in range(200)]
    run_to_completion(scheduler, pending, max_steps=5000)
    assert blocks.num_free_blocks == DEFAULT_BLOCKS
    assert scheduler.num_preemptions > 0


def test_waiting_sequences_holding_the_pool_give_it_up():
    """The jam as it was: KV pulled for waiting sequences until 4,095 of 4,096 blocks were
    held by sequences that could not join. Their blocks are taken back; all finish."""
    blocks = BlockManager(DEFAULT_BLOCKS, DEFAULT_BLOCK_SIZE)
    scheduler = Scheduler(blocks, DEFAULT_BATCH, DEFAULT_STEP_TOKENS)
    index = 0
    while blocks.can_allocate(64):
        scheduler.add(pulled(blocks, distinct_seq(index, 1000, max_tokens=200)))
        index += 1
    assert (blocks.num_free_blocks, index) == (1, 65)  # 4,095 of 4,096 blocks held
    pending = [distinct_seq(i, 1000, max_tokens=200) for i in range(index, 200)]
    run_to_completion(scheduler, pending, max_steps=5000)
    assert blocks.num_free_blocks == DEFAULT_BLOCKS


def test_a_sequence_without_blocks_takes_back_what_the_prefix_cache_holds():
    blocks = BlockManager(num_blocks=8, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64)
    seq = pulled(blocks, make_seq("a", 8))
    seq.block_hashes = [b"h0", b"h1"]
    for i, block_hash in enumerate(seq.block_hashes):
        blocks.register(seq.block_table[i], block_hash, seq.token_ids[i * 4 : (i + 1) * 4])
    scheduler.add(seq)
    scheduler._evict(seq)  # as the batch does to a waiting sequence when the pool runs dry
    step = scheduler.schedule()
    # Both prompt blocks are found again: only the last token is computed.
    assert [(s.seq.request_id, s.num_tokens) for s in step] == [("a", 1)]


def test_a_prompt_computed_here_samples_its_first_token_and_caches_its_blocks():
    blocks = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=6)
    prompt = list(range(10, 20))
    chain = hash_blocks(prompt, 4)  # its two full blocks
    # A prompt decode computes itself: no first token, nothing pulled.
    seq = make_seq("a", 10)
    seq.token_ids, seq.block_hashes, seq.computes_prompt = list(prompt), list(chain), True
    scheduler.add(seq)
    step = scheduler.schedule()
    assert [(s.num_tokens, s.samples) for s in step] == [(6, False)]
    scheduler.postprocess(step, [])
    assert blocks.match_prefix(chain, prompt) != []  # the first block, computed, is cached
    step = scheduler.schedule()
    assert [(s.num_tokens, s.samples) for s in step] == [(4, True)]
    outputs = scheduler.postprocess(step, [[7]])
    assert [(token, finish) for _, token, finish in outputs] == [(7, None)]
    assert seq.num_generated == 1 and seq.first_token_ns > 0
    # The same prompt again takes both blocks from the cache: two tokens left to compute.
    again = make_seq("b", 10)
    again.token_ids, again.block_hashes, again.computes_prompt = list(prompt), list(chain), True
    scheduler.add(again)
    step = scheduler.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step] == [("a", 1), ("b", 2)]
    assert again.num_reused_tokens == 8


def test_long_prompts_computed_here_run_in_chunks_beside_the_batch():
    blocks = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64, max_chunk_tokens=8)
    scheduler.add(pulled(blocks, make_seq("a", 4)))
    for request_id, start, length in (("long", 100, 20), ("short", 200, 3)):
        seq = make_seq(request_id, length)
        seq.token_ids, seq.computes_prompt = list(range(start, start + length)), True
        scheduler.add(seq)
    steps = []
    for _ in range(4):
        step = scheduler.schedule()
        steps.append([(s.seq.request_id, s.num_tokens) for s in step])
        scheduler.postprocess(step, [[7]] * sum(s.samples for s in step))
    # Each step computes at most 8 prompt tokens; the short prompt waits for room in one.
    assert steps == [
        [("a", 1), ("long", 8)],
        [("a", 1), ("long", 8)],
        [("a", 1), ("long", 4), ("short", 3)],
        [("a", 1), ("long", 1), ("short", 1)],
    ]


def test_the_same_prompt_again_copies_part_of_a_block_and_computes_only_its_last_token():
    blocks = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(blocks, max_batch_size=8, max_step_tokens=64)
    prompt = list(range(10, 20))  # two full blocks, then two tokens

    def computed_here(request_id: str) -> Sequence:
        seq = make_seq(request_id, len(prompt), max_tokens=1)
        seq.token_ids, seq.computes_prompt = list(prompt), True
        seq.block_hashes, seq.extends_chain = hash_blocks(prompt, 4), True
        return seq

    first = computed_here("a")
    scheduler.add(first)
    step = scheduler.schedule()
    last_block = first.block_table[2]
    # Its only token ends it: its blocks, the last one partly filled, stay in the cache.
    assert scheduler.postprocess(step, [[7]])[0][2] == Finish.LENGTH
    again = computed_here("b")
    scheduler.add(again)
    step = scheduler.schedule()
    assert [(s.num_tokens, s.samples) for s in step] == [(1, True)]
    assert again.num_reused_tokens == len(prompt) - 1
    assert scheduler.copies == [(last_block, again.block_table[2])]
