"""Sampling parameters over the real stack: each one's effect on what the model writes."""

import statistics

import openai
import pytest

CAPITAL = "The capital of France is"
ANIMAL = "My favourite animal is"
COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def complete(client, model):
    """A completion of `prompt`; Fireworks-only fields go in the body as they are."""

    def complete(prompt, max_tokens=8, temperature=0.0, **fields):
        return client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            extra_body=fields or None,
        )

    return complete


def num_repeats(token_ids: list[int], prompt_ids: list[int]) -> int:
    """Generated tokens that already occurred in the prompt or earlier in the output."""
    seen, count = set(prompt_ids), 0
    for token_id in token_ids:
        count += token_id in seen
        seen.add(token_id)
    return count


def test_logit_bias_forces_and_bans_tokens(complete):
    greedy = complete(CAPITAL, max_tokens=1, logprobs=2).choices[0].logprobs
    paris_id, paris = greedy.token_ids[0], greedy.tokens[0]
    assert paris == " Paris"
    top = greedy.top_logprobs[0]
    runner_up = max((token for token in top if token != paris), key=top.get)
    banned = complete(CAPITAL, max_tokens=1, logprobs=2, logit_bias={str(paris_id): -100})
    # The ban only removes the argmax, so the runner-up of the unbiased distribution wins.
    assert banned.choices[0].logprobs.tokens == [runner_up]
    # +100 outweighs every other logit, at every position, even when sampling.
    forced = complete(
        "Once upon a time",
        max_tokens=6,
        temperature=1.0,
        seed=3,
        logit_bias={str(paris_id): 100},
        return_token_ids=True,
    ).choices[0]
    assert forced.model_extra["token_ids"] == [paris_id] * 6
    assert forced.text == " Paris" * 6


def test_seed_reproduces_and_different_seeds_vary(complete):
    def sample(seed: int) -> str:
        return complete(ANIMAL, temperature=1.0, seed=seed).choices[0].text

    first = sample(1)
    assert sample(1) == first
    assert len({first, sample(2), sample(3), sample(4)}) > 1


def test_n_choices_are_indexed_and_differ(complete):
    single = complete(ANIMAL)
    reply = complete(ANIMAL, temperature=1.0, seed=7, n=3, ignore_eos=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.text for c in reply.choices}) > 1
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    # The prompt is counted once, the completions of all three choices together.
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * 8


def test_streamed_n_delivers_each_choice_with_its_finish(client, model):
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=1.0,
        seed=5,
        n=2,
    )
    whole = client.chat.completions.create(**kwargs)
    texts, finishes, usages = {0: "", 1: ""}, {0: [], 1: []}, []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: [c.finish_reason] for c in whole.choices}
    # Usage comes once, on the last finish, counting the prompt once.
    [usage] = [u for u in usages if u is not None]
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_greedy_equivalents(complete):
    """top_k=1, min_p near 1 and a tiny top_p each leave only the argmax, whatever the seed."""
    prompt = "The best way to learn a language is"

    def text(**fields) -> str:
        return complete(prompt, max_tokens=10, **fields).choices[0].text

    greedy = text(temperature=0.0)
    assert text(temperature=1.0, seed=9) != greedy
    assert text(temperature=1.0, seed=9, top_k=1) == greedy
    assert text(temperature=1.0, seed=9, min_p=0.99) == greedy
    assert text(temperature=1.0, seed=9, top_p=0.001) == greedy


def test_repetition_penalty_reduces_repeats(complete):
    def run(**fields):
        choice = complete(COUNTING, max_tokens=16, return_token_ids=True, **fields).choices[0]
        extra = choice.model_extra
        return choice.text, num_repeats(extra["token_ids"], extra["prompt_token_ids"])

    plain_text, plain_repeats = run()
    assert plain_text.startswith(" 6, 7, 8,")
    penalized_text, penalized_repeats = run(repetition_penalty=1.8)
    assert penalized_text != plain_text
    assert penalized_repeats < plain_repeats


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_output_penalties_change_repetitive_output(complete, penalty):
    def run(value: float):
        choice = complete(COUNTING, max_tokens=16, return_token_ids=True, **{penalty: value})
        extra = choice.choices[0].model_extra
        return choice.choices[0].text, num_repeats(extra["token_ids"], extra["prompt_token_ids"])

    plain_text, plain_repeats = run(0.0)
    penalized_text, penalized_repeats = run(2.0)
    assert penalized_text != plain_text
    assert penalized_repeats < plain_repeats


def test_mirostat_targets_the_surprise(complete):
    """Mirostat truncates the tail to aim at `mirostat_target` bits of surprise per token, so a
    low target picks likelier tokens (by the raw distribution) than a high one."""

    def run(**fields):
        reply = complete(
            "Once upon a time",
            max_tokens=16,
            temperature=1.0,
            seed=11,
            n=3,
            logprobs=True,
            ignore_eos=True,
            **fields,
        )
        surprise = [-lp for c in reply.choices for lp in c.logprobs.token_logprobs]
        return [c.text for c in reply.choices], statistics.mean(surprise)

    plain_texts, _ = run()
    low_texts, low_surprise = run(mirostat_target=1.0, mirostat_lr=0.1)
    high_texts, high_surprise = run(mirostat_target=8.0, mirostat_lr=0.5)
    assert low_texts != plain_texts
    assert all(low_texts) and all(high_texts)
    assert low_surprise < high_surprise


def test_stop_strings_end_the_text_before_them(complete, client, model):
    plain = complete(COUNTING, max_tokens=12).choices[0]
    assert plain.text.startswith(" 6, 7, 8, 9,") and plain.finish_reason == "length"
    one = complete(COUNTING, max_tokens=12, stop=" 8").choices[0]
    assert (one.text, one.finish_reason) == (" 6, 7,", "stop")
    # With several, the earliest match in the text wins, whatever its place in the list.
    several = complete(COUNTING, max_tokens=12, stop=["9", " 7"]).choices[0]
    assert (several.text, several.finish_reason) == (" 6,", "stop")
    # include_stop_str_in_output keeps the matched one, streamed or whole.
    kept = complete(COUNTING, max_tokens=12, stop=["9", " 7"], include_stop_str_in_output=True)
    assert (kept.choices[0].text, kept.choices[0].finish_reason) == (" 6, 7", "stop")
    streamed = client.completions.create(
        model=model,
        prompt=COUNTING,
        max_tokens=12,
        temperature=0,
        stop=[" 8"],
        stream=True,
        extra_body={"include_stop_str_in_output": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == " 6, 7, 8"


def test_ignore_eos_runs_to_max_tokens(client, model):
    def ask(**fields):
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=24,
            temperature=0,
            extra_body=fields or None,
        )

    stopped = ask()
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 24
    unstopped = ask(ignore_eos=True)
    assert unstopped.choices[0].finish_reason == "length"
    assert unstopped.usage.completion_tokens == 24
    assert unstopped.choices[0].message.content.startswith(stopped.choices[0].message.content)


def test_max_completion_tokens_is_an_alias(complete):
    plain = complete(CAPITAL, max_tokens=5)
    alias = complete(CAPITAL, max_tokens=None, max_completion_tokens=5)
    assert alias.usage.completion_tokens == 5 and alias.choices[0].finish_reason == "length"
    assert alias.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        complete(CAPITAL, max_tokens=5, max_completion_tokens=5)
    assert err.value.body["param"] == "max_completion_tokens"
