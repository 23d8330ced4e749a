"""Prefill scheduling: chunked, batched forward passes and pinned KV handles.

One engine thread runs forward passes; gRPC handlers on the event loop submit jobs and
take handles. `_lock` guards the job queues, the handles and the block manager.
"""

import asyncio
import logging
import threading
import time
import uuid
from collections import deque

from services.engine.block_hash import hash_block
from services.engine.block_manager import blocks_needed
from services.engine.engine_thread import EngineThread
from services.engine.grammar_batch import GrammarBatch
from services.engine.runner import SeqChunk
from services.engine.sampling_state import SampledToken, TokenHistory
from services.engine.worker import Worker
from services.errors import InvalidArgumentError, ResourceExhaustedError
from services.prefill.jobs import Handle, PrefillJob, PrefillResult

log = logging.getLogger(__name__)


class PrefillEngine:
    def __init__(
        self, worker: Worker, max_prefill_tokens: int, lease_s: float, max_queued_tokens: int
    ) -> None:
        self.worker = worker
        self.blocks = worker.pool.blocks
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queued_tokens = max_queued_tokens
        # At most one first token per prompt in a pass, so the budget bounds the rows.
        self.grammar_batch = GrammarBatch(
            worker.config.vocab_size, max_prefill_tokens, worker.device
        )
        self.lease_s = lease_s
        self.num_steps = 0
        self.step_time_ns = 0
        self.num_requests = 0
        self.num_tokens = 0
        self._waiting: deque[PrefillJob] = deque()
        self._running: list[PrefillJob] = []  # admitted: blocks held, chunks left to run
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._thread = EngineThread(
            "prefill-engine", self._poll, self._fail_all, on_start=worker.lower_compute_priority
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def submit(self, job: PrefillJob) -> None:
        if blocks_needed(len(job.token_ids), self.blocks.block_size) > self.blocks.num_blocks:
            raise InvalidArgumentError(
                f"prompt of {len(job.token_ids)} tokens can never fit the prefill KV pool "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens)"
            )
        with self._lock:
            queued = sum(j.num_remaining for j in (*self._waiting, *self._running))
            if queued and queued + len(job.token_ids) > self.max_queued_tokens:
                raise ResourceExhaustedError(
                    f"prefill has {queued} prompt tokens queued (at most "
                    f"{self.max_queued_tokens}); retry later"
                )
            self._waiting.append(job)
        self._thread.wake()

    def abort(self, request_id: str) -> bool:
        """Frees the request's queued or running prompt and its handle if nobody is pulling
        it; whether anything was freed."""
        freed = False
        with self._lock:
            for queue in (self._waiting, self._running):
                for job in list(queue):
                    if job.request_id == request_id:
                        queue.remove(job)
                        self.blocks.free(job.block_table)
                        freed = True
            for handle_id, handle in list(self._handles.items()):
                if handle.request_id == request_id and not handle.pulling:
                    self.blocks.free(self._handles.pop(handle_id).block_ids)
                    freed = True
        return freed

    def begin_pull(self, handle_id: str) -> Handle | None:
        """Marks a handle as being pulled (no second pull, no Release) until `end_pull`.
        Its lease still runs, renewed by `renew`: a puller that vanishes without ending
        (a cancelled stream whose generator is never closed) leaves nothing behind."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None or handle.pulling:
                return None
            handle.pulling = True
            handle.expires_at = time.monotonic() + self.lease_s
            return handle

    def renew(self, handle_id: str) -> Handle | None:
        """Extends a handle's lease; None once it has expired (its blocks are gone)."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is not None:
                handle.expires_at = time.monotonic() + self.lease_s
        return handle

    def end_pull(self, handle_id: str) -> None:
        with self._lock:
            handle = self._handles.pop(handle_id, None)
            if handle is not None:
                self.blocks.free(handle.block_ids)

    def release(self, handle_id: str) -> bool:
        """Frees a handle nobody is pulling; False if there is none to free."""
        with self._lock:
            handle = self._handles.get(handle_id)
            if handle is None or handle.pulling:
                return False
            del self._handles[handle_id]
            self.blocks.free(handle.block_ids)
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "num_running": len(self._running),
                "num_waiting": len(self._waiting),
                "num_free_blocks": self.blocks.num_free_blocks,
                "num_used_blocks": self.blocks.num_used_blocks,
                "num_cached_blocks": self.blocks.num_cached_blocks,
                "prefix_cache_queried_blocks": self.blocks.num_queries,
                "prefix_cache_hit_blocks": self.blocks.num_hits,
                "num_steps": self.num_steps,
                "step_time_ns": self.step_time_ns,
                "num_requests": self.num_requests,
                "num_tokens": self.num_tokens,
                "num_pinned_handles": len(self._handles),
            }

    def idle(self) -> bool:
        """No prompt queued or computing, and no handle waiting to be pulled."""
        with self._lock:
            return not (self._waiting or self._running or self._handles)

    def healthy(self) -> bool:
        with self._lock:
            has_work = bool(self._waiting or self._running)
        return self._thread.healthy(has_work)

    def _fail_all(self, exc: Exception) -> None:
        """After a failure outside a pass: every job ends with the error."""
        with self._lock:
            running, waiting = list(self._running), list(self._waiting)
            self._waiting.clear()
        for job in running:
            self._finish(job, exc)
        for job in waiting:
            job.loop.call_soon_threadsafe(_resolve, job.future, exc, self)

    def _poll(self) -> bool:
        """One turn of the engine thread: expires leases, then runs a pass if there is work."""
        self._expire_handles()
        batch = self._schedule()
        if not batch:
            return False
        try:
            self._run(batch)
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception(
                "prefill step failed; failing %s", ", ".join(j.request_id for j, _ in batch)
            )
            for job, _ in batch:
                self._finish(job, exc)
        return True

    def _schedule(self) -> list[tuple[PrefillJob, SeqChunk]]:
        """Fills the token budget, fewest remaining tokens first: a short prompt that arrives
        behind a long one runs in the next pass, and the long one takes what is left."""
        budget = self.max_prefill_tokens
        batch = []
        with self._lock:
            while self._waiting and self._admit(self._waiting[0]):
                self._running.append(self._waiting.popleft())
            for job in sorted(self._running, key=lambda j: j.num_remaining):
                if budget == 0:
                    break
                end = min(len(job.token_ids), job.num_computed + budget)
                chunk = SeqChunk(
                    job.token_ids[job.num_computed : end],
                    job.num_computed,
                    job.block_table,
                    all_logits=job.wants_prompt_logprobs,
                    samples=end == len(job.token_ids),
                )
                budget -= end - job.num_computed
                batch.append((job, chunk))
        return batch

    def _admit(self, job: PrefillJob) -> bool:
        """Reuses the longest cached prefix, whole blocks and then part of the next one, and
        allocates blocks for the rest of the prompt."""
        block_size = self.blocks.block_size
        servable = job.block_hashes[: job.servable_tokens // block_size]
        hits = (
            [] if job.wants_prompt_logprobs else self.blocks.match_prefix(servable, job.token_ids)
        )
        missing = blocks_needed(len(job.token_ids), block_size) - len(hits)
        if not self.blocks.can_allocate(missing):
            self.blocks.free(hits)
            return False
        job.block_table = hits + self.blocks.allocate(missing)
        job.num_computed = job.num_cached_tokens = len(hits) * block_size
        if not job.wants_prompt_logprobs:
            job.num_computed = job.num_cached_tokens = job.num_computed + self._reuse_part(job)
        job.num_registered_blocks = len(hits)
        return True

    def _reuse_part(self, job: PrefillJob) -> int:
        """Copies into the first uncached block the KV of a cached block that follows the same
        prefix and starts with the same tokens (another prompt that diverges inside this
        block); returns how many tokens that serves. KV is a function of the prefix alone,
        so the copy equals what computing those tokens would write."""
        block_size = self.blocks.block_size
        index = job.num_computed // block_size
        start = index * block_size
        end = min(start + block_size, job.servable_tokens)
        if end <= start:
            return 0
        source, length = self.blocks.match_partial(job.parent(index), job.token_ids[start:end])
        if source is None:
            return 0
        self.worker.pool.copy_block(source, job.block_table[index])
        self.blocks.free([source])
        return length

    def _register_computed_blocks(self, job: PrefillJob) -> None:
        """Offers each newly completed full block to the prefix cache and, once the whole
        prompt is computed, its last block if that is not full: a later prompt that starts
        the same way copies those tokens' KV (`_reuse_part`) instead of computing them, so
        the same prompt again computes only its last token."""
        block_size = self.blocks.block_size
        num_full = min(job.num_computed // block_size, len(job.block_hashes))
        for i in range(job.num_registered_blocks, num_full):
            tokens = job.token_ids[i * block_size : (i + 1) * block_size]
            self.blocks.register(job.block_table[i], job.block_hashes[i], tokens, job.parent(i))
        job.num_registered_blocks = max(job.num_registered_blocks, num_full)
        last = len(job.token_ids) // block_size
        if (
            job.num_computed == len(job.token_ids)
            and len(job.token_ids) % block_size
            and len(job.block_hashes) == last  # the cache may hold every full block before it
        ):
            tokens = job.token_ids[last * block_size :]
            parent = job.parent(last)
            self.blocks.register(job.block_table[last], hash_block(parent, tokens), tokens, parent)

    def _run(self, batch: list[tuple[PrefillJob, SeqChunk]]) -> None:
        start = time.monotonic_ns()
        logits = self.worker.runner.forward([chunk for _, chunk in batch])
        last_rows, done, offset = [], [], 0
        for job, chunk in batch:
            if chunk.all_logits:
                job.add_prompt_logprobs(logits[offset : offset + chunk.num_logits], chunk.start_pos)
            offset += chunk.num_logits
            if chunk.samples:
                done.append(job)
                last_rows.append(offset - 1)
        first_tokens = []
        if done:
            rows = logits[last_rows]
            if any(job.grammar for job in done):
                self.grammar_batch.apply(rows, [job.grammar for job in done])
            first_tokens = self.worker.sampler.sample_tokens(
                rows,
                [job.sampling for job in done],
                [len(job.token_ids) for job in done],
                [TokenHistory(job.token_ids, []) for job in done],
                [job.mirostat for job in done],
            )
        elapsed = time.monotonic_ns() - start
        self.num_steps += 1
        self.step_time_ns += elapsed
        with self._lock:
            for job, chunk in batch:
                job.first_run_ns = job.first_run_ns or start
                job.compute_ns += elapsed
                job.num_computed += len(chunk.token_ids)
                if job in self._running:  # not aborted while the pass ran
                    self._register_computed_blocks(job)
        for job, token in zip(done, first_tokens, strict=True):
            self._finish(job, token)

    def _finish(self, job: PrefillJob, outcome: SampledToken | Exception) -> None:
        with self._lock:
            if job not in self._running:
                return  # aborted meanwhile; abort() freed its blocks
            self._running.remove(job)
            if isinstance(outcome, Exception):
                self.blocks.free(job.block_table)
                result: PrefillResult | Exception = outcome
            else:
                self.num_requests += 1
                self.num_tokens += len(job.token_ids) - job.num_cached_tokens
                handle_id = uuid.uuid4().hex
                expires = time.monotonic() + self.lease_s
                self._handles[handle_id] = Handle(
                    job.request_id, job.block_table, len(job.token_ids), expires
                )
                result = PrefillResult(
                    handle_id=handle_id,
                    first_token=outcome,
                    block_ids=job.block_table,
                    num_cached_tokens=job.num_cached_tokens,
                    queue_ns=job.first_run_ns - job.arrival_ns,
                    compute_ns=job.compute_ns,
                    prompt_logprobs=job.prompt_logprobs,
                    mirostat_mu=None if job.mirostat is None else job.mirostat.mu,
                )
        job.loop.call_soon_threadsafe(_resolve, job.future, result, self)

    def _expire_handles(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [hid for hid, h in self._handles.items() if h.expires_at <= now]
            for handle_id in expired:
                self.blocks.free(self._handles.pop(handle_id).block_ids)
        if expired:
            log.warning("freed %d KV handles whose lease expired", len(expired))


def _resolve(
    future: asyncio.Future, result: "PrefillResult | Exception", engine: PrefillEngine
) -> None:
    if future.cancelled():
        # The caller is gone: nobody will pull these blocks.
        if isinstance(result, PrefillResult):
            engine.release(result.handle_id)
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
