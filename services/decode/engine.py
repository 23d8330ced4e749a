"""The decode loop: schedule -> one forward pass for the whole batch -> sample -> deliver.

Runs in its own thread. Requests are added and aborted from the event loop; both take
effect at the next step boundary, so blocks are never freed under a running forward.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import torch

from services.decode.drafts import num_accepted
from services.decode.prefill_allowlist import PrefillAllowList
from services.decode.scheduler import Scheduled, Scheduler
from services.decode.sequence import Finish, Sequence
from services.engine.block_manager import BlockManager
from services.engine.engine_thread import EngineThread
from services.engine.grammar_batch import GrammarBatch
from services.engine.logprobs import token_logprobs
from services.engine.runner import SeqChunk
from services.engine.sampling_state import SampledToken, TokenHistory
from services.engine.worker import Worker

log = logging.getLogger(__name__)

Deliver = Callable[[list[tuple[Sequence, SampledToken | None, Finish | None]]], None]
_NO_HISTORY = TokenHistory((), ())


class DecodeEngine:
    def __init__(
        self,
        worker: Worker,
        max_batch_size: int,
        max_step_tokens: int,
        deliver: Deliver,
        max_queued_requests: int,
        prefill_instances: PrefillAllowList,
        max_draft_tokens: int = 0,
        prompt_lookup: bool = False,
        max_chunk_tokens: int | None = None,
    ) -> None:
        """`deliver` is called on the event loop that calls `start`, once per step with that
        step's new tokens. Beyond `max_queued_requests` waiting to join the batch, decode
        refuses new ones; it pulls KV only from `prefill_instances`. A sequence verifies at
        most `max_draft_tokens` drafts a step (0: no speculation); `prompt_lookup` drafts for
        requests without a prediction. A step computes at most `max_chunk_tokens` prompt
        tokens (a prompt decode computes itself, or one recomputed after a preemption)."""
        self.worker = worker
        self.max_queued_requests = max_queued_requests
        self.prefill_instances = prefill_instances
        self.max_draft_tokens = max_draft_tokens
        self.prompt_lookup = prompt_lookup
        self.blocks: BlockManager = worker.pool.blocks
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_step_tokens, max_chunk_tokens)
        self.grammar_batch = GrammarBatch(
            worker.config.vocab_size, max_batch_size * (1 + max_draft_tokens), worker.device
        )
        self.num_steps = 0
        self.last_step_batch_size = 0
        self.max_step_batch_size = 0
        self.step_time_ns = 0
        self.num_grammar_steps = 0
        self.grammar_time_ns = 0
        self.num_requests = 0
        self.num_tokens = 0
        # Guards the scheduler and the block manager (KV pulls allocate from the event loop).
        self.lock = threading.Lock()
        self._pending_aborts: list[str] = []
        self._deliver = deliver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = EngineThread(
            "decode-engine", self._poll, self._fail_all, on_start=worker.lower_compute_priority
        )

    def start(self) -> None:
        """Starts the engine thread; call it on the event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def begin_pull(
        self, block_hashes: list[bytes], prompt_ids: list[int], num_blocks: int
    ) -> tuple[list[int], list[int]] | None:
        """`Scheduler.begin_pull`: (reused, new) blocks once the sequence can join, else None."""
        with self.lock:
            return self.scheduler.begin_pull(block_hashes, prompt_ids, num_blocks)

    def end_pull(self, seq: Sequence | None, failed_blocks: list[int] = ()) -> None:
        """Ends a pull: `seq` joins the waiting sequences, or the pull failed and
        `failed_blocks` are freed."""
        with self.lock:
            self.blocks.free(list(failed_blocks))
            self.scheduler.end_pull(seq)
            if seq is not None:
                self.num_requests += 1
        self._thread.wake()

    def add(self, seq: Sequence) -> None:
        """A sequence that computes its prompt here (no KV to pull) waits to join."""
        with self.lock:
            self.scheduler.add(seq)
            self.num_requests += 1
        self._thread.wake()

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._pending_aborts.append(request_id)
        self._thread.wake()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "num_free_blocks": self.blocks.num_free_blocks,
                "num_used_blocks": self.blocks.num_used_blocks,
                "num_cached_blocks": self.blocks.num_cached_blocks,
                "prefix_cache_queried_blocks": self.blocks.num_queries,
                "prefix_cache_hit_blocks": self.blocks.num_hits,
                "num_preemptions": self.scheduler.num_preemptions,
                "num_steps": self.num_steps,
                "max_step_batch_size": self.max_step_batch_size,
                "last_step_batch_size": self.last_step_batch_size,
                "step_time_ns": self.step_time_ns,
                "num_grammar_steps": self.num_grammar_steps,
                "grammar_time_ns": self.grammar_time_ns,
                "num_requests": self.num_requests,
                "num_tokens": self.num_tokens,
            }

    def _poll(self) -> bool:
        """One turn of the engine thread: applies aborts, then runs a step if there is work."""
        with self.lock:
            for request_id in self._pending_aborts:
                self.scheduler.abort(request_id)
            self._pending_aborts.clear()
            scheduled = self.scheduler.schedule()
            copies, self.scheduler.copies = self.scheduler.copies, []
        for source, target in copies:  # partial prefix-cache hits, before their step
            self.worker.pool.copy_block(source, target)
        if copies:
            with self.lock:
                self.blocks.free([source for source, _ in copies])
        if not scheduled:
            return False
        try:
            outputs = self._step(scheduled)
        except Exception:  # noqa: BLE001 - fail these requests, keep serving others
            failed = ", ".join(item.seq.request_id for item in scheduled)
            log.exception("decode step failed; failing %s", failed)
            outputs = self._fail(scheduled)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outputs)
        return True

    def _step(self, scheduled: list[Scheduled]) -> list:
        started_ns = time.perf_counter_ns()
        chunks = [
            SeqChunk(
                item.seq.token_ids[item.seq.num_cached : item.seq.num_cached + item.num_tokens]
                + item.draft,
                item.seq.num_cached,
                item.seq.block_table,
                all_logits=bool(item.draft),
                samples=item.samples,
            )
            for item in scheduled
        ]
        # Logit rows: one per sampling sequence, 1 + len(draft) for one verifying drafts.
        logits = self.worker.runner.forward(chunks)
        sampling = [item for item in scheduled if item.samples]
        new_tokens: list[list[SampledToken]] = []
        if sampling:
            new_tokens = self._sample(logits, sampling)
        self.num_steps += 1
        self.num_tokens += sum(len(tokens) for tokens in new_tokens)
        self.step_time_ns += time.perf_counter_ns() - started_ns
        self.last_step_batch_size = len(scheduled)
        self.max_step_batch_size = max(self.max_step_batch_size, len(scheduled))
        with self.lock:
            outputs = self.scheduler.postprocess(
                scheduled, [[t.token_id for t in tokens] for tokens in new_tokens]
            )
        # Each sequence's outputs are its first new tokens, up to the one that finished it.
        results, pos = [], 0
        for tokens in new_tokens:
            seq = outputs[pos][0]
            for token in tokens:
                if pos == len(outputs) or outputs[pos][0] is not seq:
                    break
                results.append((seq, token, outputs[pos][2]))
                pos += 1
        return results

    def _sample(self, logits: torch.Tensor, items: list[Scheduled]) -> list[list[SampledToken]]:
        """Samples every row of the sequences that sample this step; returns each one's new
        tokens (`drafts.num_accepted`). Row j's penalties, position (seeds) and grammar state
        follow the draft's first j tokens, so a sequence's tokens are those it would generate
        without drafts."""
        params, positions, histories, mirostat, states, drafts = [], [], [], [], [], []
        for item in items:
            seq = item.seq
            history = seq.history() if seq.sampling.needs_history else _NO_HISTORY
            for j in range(1 + len(item.draft)):
                params.append(seq.sampling)
                positions.append(len(seq.token_ids) + j)
                if j and seq.sampling.needs_history:
                    output = [*history.output_ids, item.draft[j - 1]]
                    history = TokenHistory(history.prompt_ids, output)
                histories.append(history)
                mirostat.append(seq.mirostat)
            states.append(seq.grammar)
            drafts.append(item.draft)
        constrained = any(states)
        if constrained:
            mask_started_ns = time.perf_counter_ns()
            self.grammar_batch.apply(logits, states, drafts)
            grammar_ns = time.perf_counter_ns() - mask_started_ns
        sampled = self.worker.sampler.sample_tokens(logits, params, positions, histories, mirostat)
        new_tokens, row = [], 0
        for item in items:
            rows = sampled[row : row + 1 + len(item.draft)]
            row += len(rows)
            accepted = num_accepted([t.token_id for t in rows], item.draft)
            if item.seq.drafter is not None:
                item.seq.drafter.record(len(item.draft), accepted)
            new_tokens.append(rows[: accepted + 1])
        if constrained:
            accept_started_ns = time.perf_counter_ns()
            row = 0
            for item, tokens in zip(items, new_tokens, strict=True):
                if item.seq.closer is not None:
                    self._accept_within_budget(item.seq, tokens, logits, row)
                row += 1 + len(item.draft)
            grammar_ns += time.perf_counter_ns() - accept_started_ns
            self.num_grammar_steps += 1
            self.grammar_time_ns += grammar_ns
        return new_tokens

    def _accept_within_budget(
        self, seq: Sequence, tokens: list[SampledToken], logits: torch.Tensor, first_row: int
    ) -> None:
        """Accepts a constrained sequence's new tokens into its grammar. Where its closer puts
        the document's completion in place of a sampled token, the tokens after it are dropped
        and the sequence ends with the completion."""
        assert seq.closer is not None
        for j, token in enumerate(tokens):
            token_id = seq.closer.accept(token.token_id, seq.tokens_left - j)
            if token_id != token.token_id:
                row = logits[first_row + j : first_row + j + 1]
                chosen = torch.tensor([token_id], device=logits.device)
                tokens[j:] = [
                    SampledToken(token_id, *token_logprobs(row, [seq.sampling], chosen)[0])
                ]
                break
        if seq.closer.closing is not None:
            seq.stop.max_tokens = seq.num_generated + len(tokens) + len(seq.closer.closing)

    def healthy(self) -> bool:
        with self.lock:
            has_work = bool(self.scheduler.running or self.scheduler.waiting)
        return self._thread.healthy(has_work)

    def _fail_all(self, exc: Exception) -> None:
        """After a failure outside a step: every sequence ends with an error, and whatever
        state broke the turn goes with them."""
        with self.lock:
            seqs = [*self.scheduler.running, *self.scheduler.waiting]
            for seq in seqs:
                self.scheduler.abort(seq.request_id)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, [(seq, None, Finish.ABORT) for seq in seqs])

    def _fail(self, scheduled: list[Scheduled]) -> list:
        with self.lock:
            for item in scheduled:
                self.scheduler.abort(item.seq.request_id)
        return [(item.seq, None, Finish.ABORT) for item in scheduled]
