"""Our Llama forward equals an independent implementation (transformers) on the same GGUF.

One teacher-forced reference pass over prompt + our greedy tokens checks both: the
reference's argmax at every position must be our next token (so its greedy decoding
equals ours token for token), and its logits must agree within LOGITS_ATOL (float32).
"""

import os

import pytest
import torch

from services.engine import loader
from services.engine.kv_pool import KVPool
from services.engine.model import build_model
from services.engine.runner import ModelRunner, SeqChunk

NUM_NEW_TOKENS = 32
# float32 on both sides; differences come only from summation order.
LOGITS_ATOL = 2e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "The three primary colors are",
    "Translate to French: Good morning, how are you?",
    "List five prime numbers:",
    "Once upon a time, in a small village,",
    "Explain why the sky is blue in one sentence.",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def tokenizer():
    return loader.load_tokenizer("default")


@pytest.fixture(scope="module")
def runner():
    config = loader.load_config("default")
    model = build_model(config, loader.load_weights("default", torch.float32), torch.device("cpu"))
    pool = KVPool(
        config, num_tokens=8192, block_size=16, dtype=torch.float32, device=torch.device("cpu")
    )
    return ModelRunner(model, pool, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = loader.default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.render_chat(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    return tokenizer.encode(rendered)


def generate_batched(runner: ModelRunner, prompts: list[list[int]]):
    """Greedy decoding of all prompts together: one forward pass per step for the batch."""
    blocks = runner.pool.blocks
    tables = [blocks.allocate(-(-(len(p) + NUM_NEW_TOKENS) // 16)) for p in prompts]
    seqs = [list(p) for p in prompts]
    chunks = [SeqChunk(list(p), 0, t) for p, t in zip(prompts, tables, strict=True)]
    step_logits = []
    for _ in range(NUM_NEW_TOKENS):
        logits = runner.forward(chunks)
        step_logits.append(logits)
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.append(token)
        chunks = [SeqChunk([s[-1]], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
    for table in tables:
        blocks.free(table)
    # [num_prompts, NUM_NEW_TOKENS, vocab]
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)], torch.stack(
        step_logits, dim=1
    )


def test_greedy_tokens_and_logits_match_transformers(tokenizer, runner, reference):
    prompts = [chat_prompt_ids(tokenizer, text) for text in PROMPTS[:4]]
    prompts += [tokenizer.encode(text) for text in PROMPTS[4:]]
    ours, our_logits = generate_batched(runner, prompts)
    for i, (prompt, tokens) in enumerate(zip(prompts, ours, strict=True)):
        with torch.no_grad():
            forced = reference(torch.tensor([prompt + tokens])).logits[0]
        # Logits that predicted each of our tokens: positions len(prompt)-1 .. end-1.
        ref_logits = forced[len(prompt) - 1 : len(prompt) - 1 + NUM_NEW_TOKENS]
        expected = ref_logits.argmax(-1).tolist()
        assert tokens == expected, f"prompt {i}: {tokenizer.decode(tokens)!r}"
        diff = (our_logits[i] - ref_logits).abs().max().item()
        assert diff < LOGITS_ATOL, f"prompt {i}: max |logit diff| {diff}"


def test_paris(tokenizer, runner):
    (tokens,), _ = generate_batched(runner, [chat_prompt_ids(tokenizer, PROMPTS[0])])
    assert "Paris" in tokenizer.decode(tokens)
