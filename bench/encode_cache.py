"""Tokenizer benchmark: a growing conversation encoded whole, and through the tokenizer
service's encode cache (only each turn's new messages).

    python -m bench.encode_cache [--model default] [--turns 40] [--words 300]

Each turn adds a message of --words words and renders the chat with the model's template;
the prompt of every user turn is encoded both ways (median of 5 repeats for the whole text;
the cache's first encoding of that prompt, which finds all but the new messages cached).
Prints one line per few turns and checks that both give the same ids.
"""

import argparse
import random
import statistics
import time

from bench.serving import WORDS
from services.engine import loader
from services.tokenizer.encode_cache import EncodeCache


def timed_ms(encode, text: str) -> tuple[float, list[int]]:
    started = time.perf_counter()
    ids = encode(text)
    return (time.perf_counter() - started) * 1e3, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--words", type=int, default=300)
    args = parser.parse_args()
    tokenizer = loader.load_tokenizer(args.model)
    cache = EncodeCache(tokenizer, 1 << 18)
    rng = random.Random(0)
    chat: list[dict[str, str]] = []
    for turn in range(args.turns):
        role = "user" if turn % 2 == 0 else "assistant"
        chat.append({"role": role, "content": " ".join(rng.choices(WORDS, k=args.words))})
        if role != "user":
            continue
        prompt = tokenizer.render_chat(chat, add_generation_prompt=True)
        cached_ms, cached_ids = timed_ms(cache.encode, prompt)
        runs = [timed_ms(tokenizer.encode, prompt) for _ in range(5)]
        assert all(ids == cached_ids for _, ids in runs), "the cache changed the ids"
        whole_ms = statistics.median(ms for ms, _ in runs)
        if turn % 8 == 0 or turn + 2 >= args.turns:
            print(
                f"turn {turn + 1:3d}: {len(cached_ids):6d} tokens, whole {whole_ms:6.2f} ms, "
                f"new messages only {cached_ms:5.2f} ms"
            )


if __name__ == "__main__":
    main()
