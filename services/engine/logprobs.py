"""Log-probabilities as the model gave them: log-softmax of the raw logits, before logit
bias, penalties, temperature and filters, so they do not depend on how a token was drawn."""

import torch

from services.request_params import SamplingParams

Logprobs = tuple[float | None, list[tuple[int, float]]]


def token_logprobs(
    raw_logits: torch.Tensor, params: list[SamplingParams], token_ids: torch.Tensor
) -> list[Logprobs]:
    """raw_logits: [num_rows, vocab]; token_ids: [num_rows], the sampled tokens. Returns, per
    row, the sampled token's logprob and its top_logprobs alternatives, most likely first; rows
    that asked for neither get (None, [])."""
    result: list[Logprobs] = [(None, []) for _ in params]
    rows = [i for i, p in enumerate(params) if p.wants_logprobs]
    if not rows:
        return result
    if len(rows) < len(params):  # (all rows: no copy of the logits)
        index = torch.tensor(rows, device=raw_logits.device)
        raw_logits, token_ids = raw_logits[index], token_ids[index]
    log_probs = raw_logits.float().log_softmax(dim=-1)  # [len(rows), vocab]
    chosen = log_probs.gather(-1, token_ids[:, None]).squeeze(-1).tolist()
    num_top = max(params[i].top_logprobs for i in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if num_top:
        top = log_probs.topk(num_top, dim=-1)  # sorted, descending
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for j, row in enumerate(rows):
        k = params[row].top_logprobs
        result[row] = (chosen[j], list(zip(top_ids[j][:k], top_values[j][:k], strict=True)))
    return result
