"""HTTP frontend: the OpenAI/Fireworks API over the tokenizer, prefill and decode stages."""
