"""The default model run directly in the test process, to check what the services compute."""

import torch

from services.engine import kernels, loader
from services.engine.attention import tokens_kv
from services.engine.kv_pool import KVPool
from services.engine.model import build_model
from services.engine.runner import ModelRunner, SeqChunk
from services.engine.weights import load_weights
from services.engine.worker import kv_cache_dtype


def as_matmul_inputs(x: torch.Tensor) -> torch.Tensor:
    """x as the matmul kernels read it: with int16 activations, each row's 32-input blocks
    rounded to a = round(x * 32767 / max|x|) (float32 arithmetic, ties to even) times the
    scale max|x| / 32767."""
    if kernels.matmul_inputs() == "float32":
        return x
    blocks = x.reshape(-1, 32)
    absmax = blocks.abs().amax(-1, keepdim=True)
    # (a tensor, not the scalar: `32767.0 / t` is 32767.0 * (1 / t) in torch, rounded twice)
    inv = torch.where(absmax > 0, torch.full_like(absmax, 32767.0) / absmax, 0.0)
    return (torch.round(blocks * inv).double() * (absmax / 32767.0).double()).reshape(x.shape)


def default_runner(num_tokens: int, block_size: int = 16) -> ModelRunner:
    """The default model as the services run it by default: the GGUF's own blocks, float32
    activations, our CPU kernels, the default KV cache dtype."""
    config = loader.load_config("default")
    weights = load_weights("default", torch.float32, keep_blocks=True)
    cpu = torch.device("cpu")
    model = build_model(config, weights, cpu)
    kv_dtype = kv_cache_dtype("auto", torch.float32, cpu, config.head_dim)
    return ModelRunner(model, KVPool(config, num_tokens, block_size, kv_dtype, cpu), cpu)


class Reference:
    """The default model run directly in this process, as the services run it."""

    def __init__(self, num_tokens: int = 4096, block_size: int = 16) -> None:
        self.runner = default_runner(num_tokens, block_size)
        self.config = self.runner.model.config
        self.pool = self.runner.pool
        self.block_size = block_size

    def _allocate(self, num_tokens: int) -> list[int]:
        return self.pool.blocks.allocate(-(-num_tokens // self.block_size))

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens after `prompt`: the whole prompt in one pass, then one per step."""
        table = self._allocate(len(prompt) + max_tokens)
        eos = set(self.config.eos_token_ids)
        tokens: list[int] = []
        chunk = SeqChunk(list(prompt), 0, table)
        try:
            while len(tokens) < max_tokens and not eos.intersection(tokens[-1:]):
                with torch.no_grad():
                    tokens.append(int(self.runner.forward([chunk]).argmax(-1)))
                chunk = SeqChunk(tokens[-1:], len(prompt) + len(tokens) - 1, table)
        finally:
            self.pool.blocks.free(table)
        return tokens

    def prompt_kv(self, prompt: list[int]) -> torch.Tensor:
        """The prompt's KV: [num_layers, 2, num_tokens, num_kv_heads, head_dim]."""
        table = self._allocate(len(prompt))
        try:
            with torch.no_grad():
                self.runner.forward([SeqChunk(list(prompt), 0, table)])
            kv = tokens_kv(self.pool.cache, table, self.config.head_dim).clone()
        finally:
            self.pool.blocks.free(table)
        return kv[:, :, : len(prompt)]
