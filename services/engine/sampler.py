"""Batched next-token sampling, one token per row, on the device the logits live on.

Each row goes through these steps, in this order:
  1. logprobs, when asked, come from log_softmax of the raw logits, before anything below;
  2. logit_bias is added;
  3. repetition_penalty over prompt and output tokens: positive logits divided, negative
     ones multiplied (once per distinct token);
  4. frequency_penalty * count + presence_penalty * (count > 0) over output tokens,
     subtracted;
  5. greedy rows (temperature 0 or top_k 1) take the argmax here and stop;
  6. temperature;
  7. mirostat v2 for rows with mirostat_target, which then skip steps 8-11;
  8. top-k, 9. top-p, 10. min-p (p < min_p * p_max dropped), 11. typical-p;
 12. one uniform draw per row picks from what is left by inverting its cumulative
     distribution (float64); rows with a seed draw from a generator seeded by (seed,
     position), so a seeded request's output does not depend on its batch. (A race over
     per-token noise draws the same distribution but costs a random number per vocabulary
     entry: sampling a row took 0.97 ms on a CPU core that way, 0.27 ms this way.)
Features no row asks for cost nothing; those some rows ask for run on those rows only.
"""

import torch
import torch.nn.functional as F

from services.engine import kernels
from services.engine import mirostat as mirostat_v2
from services.engine.logits_processors import apply_logit_bias, apply_penalties
from services.engine.logprobs import token_logprobs
from services.engine.sampling_filters import apply_filters
from services.engine.sampling_state import MirostatState, SampledToken, TokenHistory
from services.request_params import SamplingParams

# Keeps (seed, position) pairs apart when folded into one generator seed.
_POSITION_STRIDE = 1_000_003
_NO_HISTORY = TokenHistory(prompt_ids=(), output_ids=())


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.seed() if seed is None else self._shared.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
    ) -> list[int]:
        """logits: [num_rows, vocab]; positions: index of the token being sampled. Without
        token histories penalties see no tokens, and mirostat rows restart every call."""
        states = [
            None if p.mirostat_target is None else MirostatState.start(p.mirostat_target)
            for p in params
        ]
        histories = [_NO_HISTORY] * len(params)
        sampled = self.sample_tokens(logits, params, positions, histories, states)
        return [token.token_id for token in sampled]

    def sample_tokens(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        positions: list[int],
        histories: list[TokenHistory],
        mirostat: list[MirostatState | None],
    ) -> list[SampledToken]:
        """logits: [num_rows, vocab]; positions: index of the token being sampled; histories:
        the tokens each row's penalties count; mirostat: each row's state, required for rows
        with mirostat_target and updated in place when such a row samples (not greedy)."""
        num_rows = logits.shape[0]
        if not len(params) == len(positions) == len(histories) == len(mirostat) == num_rows:
            raise ValueError("sample_tokens needs one params, position, history, state per row")
        raw = logits.float()  # every step below is out of place, so raw stays raw
        logits = apply_penalties(apply_logit_bias(raw, params), params, histories)
        token_ids = argmax_rows(logits)  # [num_rows]; final for greedy rows
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        surprise_rows: list[int] = []
        surprises: list[float] = []
        if random_rows:
            surprise_rows, surprise = self._draw(
                logits, token_ids, random_rows, params, positions, mirostat
            )
            surprises = surprise.tolist() if surprise is not None else []
        ids = token_ids.tolist()
        for row, observed in zip(surprise_rows, surprises, strict=True):
            target, lr = params[row].mirostat_target, params[row].mirostat_lr
            state = mirostat[row]
            assert target is not None and state is not None  # checked by _probs
            mirostat_v2.update(state, target, lr, observed)
        logprobs = token_logprobs(raw, params, token_ids)
        return [SampledToken(ids[i], *logprobs[i]) for i in range(num_rows)]

    def _draw(
        self,
        logits: torch.Tensor,
        token_ids: torch.Tensor,
        rows: list[int],
        params: list[SamplingParams],
        positions: list[int],
        mirostat: list[MirostatState | None],
    ) -> tuple[list[int], torch.Tensor | None]:
        """Writes the draws of the non-greedy rows into token_ids; returns the mirostat rows
        and the surprise of their draws, [len(mirostat rows)], still on the device."""
        index = torch.tensor(rows, device=logits.device)
        chosen = [params[i] for i in rows]
        temps = torch.tensor([p.temperature for p in chosen], device=logits.device)
        scaled = (logits if len(rows) == len(params) else logits[index]) / temps[:, None]
        miro = [j for j, p in enumerate(chosen) if p.mirostat_target is not None]
        probs = _probs(scaled, chosen, miro, [mirostat[rows[j]] for j in miro])
        uniform = self._uniform(chosen, [positions[i] for i in rows]).to(probs.device)
        drawn = invert_cdf(probs, uniform)
        token_ids[index] = drawn
        if not miro:
            return [], None
        miro_index = torch.tensor(miro, device=logits.device)
        surprise = mirostat_v2.observed_surprise(probs[miro_index], drawn[miro_index])
        return [rows[j] for j in miro], surprise

    def _uniform(self, params: list[SamplingParams], positions: list[int]) -> torch.Tensor:
        """One draw in (0, 1] per row, [rows] float64: seeded rows from (seed, position)."""
        options = {"dtype": torch.float64, "device": self.device}
        draws = 1 - torch.rand(len(params), generator=self._shared, **options)
        for i, p in enumerate(params):
            if p.seed is not None:
                self._seeded.manual_seed((p.seed * _POSITION_STRIDE + positions[i]) % 2**63)
                draws[i] = 1 - torch.rand(1, generator=self._seeded, **options)
        return draws


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim of [num_rows, vocab], on our kernels' threads on CPU."""
    if kernels.serves(logits):
        return torch.ops.llmserve.argmax_rows(logits)
    return logits.argmax(dim=-1)


_CDF_BLOCK = 256


def invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative mass reaches u * total (u in (0, 1]): a token
    with mass > 0, drawn with probability its share. Two levels (blocks of 256 tokens, then
    the tokens of one block), cumulated in float64, so a row costs a reduction, not a scan."""
    num_rows, vocab = probs.shape
    padded = probs if vocab % _CDF_BLOCK == 0 else F.pad(probs, (0, -vocab % _CDF_BLOCK))
    blocks = padded.view(num_rows, -1, _CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [rows, num_blocks]
    target = uniform * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None]).squeeze(1)
    block = block.clamp(max=block_cdf.shape[1] - 1)
    before = block_cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1) * (block > 0)
    rows = torch.arange(num_rows, device=probs.device)
    within = blocks[rows, block].double().cumsum(dim=-1) + before[:, None]  # [rows, 256]
    # Rounding may put the target past the block's own total: take its last token with mass.
    target = torch.minimum(target, within[:, -1])
    offset = torch.searchsorted(within, target[:, None]).squeeze(1).clamp(max=_CDF_BLOCK - 1)
    return block * _CDF_BLOCK + offset


def _probs(
    scaled: torch.Tensor,
    params: list[SamplingParams],
    miro: list[int],
    states: list[MirostatState | None],
) -> torch.Tensor:
    """scaled: [num_rows, vocab] after temperature; miro: the rows using mirostat, with their
    states. Returns the distribution each row draws from, [num_rows, vocab]."""
    if not miro:
        return apply_filters(scaled, params).softmax(dim=-1)
    mus = []
    for state in states:
        if state is None:
            raise ValueError("a row with mirostat_target needs a MirostatState")
        mus.append(state.mu)
    probs = torch.empty_like(scaled)
    miro_set = set(miro)
    race = [j for j in range(len(params)) if j not in miro_set]
    if race:
        index = torch.tensor(race, device=scaled.device)
        filtered = apply_filters(scaled[index], [params[j] for j in race])
        probs[index] = filtered.softmax(dim=-1)
    index = torch.tensor(miro, device=scaled.device)
    probs[index] = mirostat_v2.truncated_probs(scaled[index], mus)
    return probs
