"""lm-evaluation-harness's `local-completions` model against the real stack: a small local
multiple-choice task (loglikelihood: the prompt echoed with its logprobs), each choice's summed
log-likelihood compared with transformers in float32 on the same dequantized GGUF weights.

The stack runs its engines in float32 on the dequantized weights, with a float32 KV cache
(`--quantization none --kv-cache-dtype float32`), so the
two sides differ only in summation order (measured: 2.1e-6 at most per choice); on the GGUF's own
blocks and our CPU kernels (the default stack) they differ by up to 8.5e-4 with int16
activations, beyond ATOL. No network: the task and its dataset are files in a temporary folder,
and lm-eval's tokenizer (it counts the context's tokens) is the GGUF's, saved as a transformers
tokenizer folder.
"""

import json
import os
import pathlib

import lm_eval
import openai
import pytest
import torch
import transformers

from services.engine import loader
from tests.conftest import start_stack

ATOL = 1e-4
TASK = "llmserve_capitals"
DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"]},
    {"question": "What is the capital of Japan?", "choices": ["Osaka", "Tokyo", "Kyoto"]},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"]},
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"]},
]
ANSWERS = [0, 1, 1, 0]
# str.format fields: {task} and {data}; the Jinja fields doubled.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def float32_stack():
    stack = start_stack(
        "--engine-args", "--quantization none --dtype float32 --kv-cache-dtype float32"
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    path = loader.default_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        os.fspath(path.parent), gguf_file=path.name
    )
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference():
    path = loader.default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def task_dir(root: pathlib.Path) -> pathlib.Path:
    data = root / "capitals.jsonl"
    rows = [{**doc, "answer": answer} for doc, answer in zip(DOCS, ANSWERS, strict=True)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return root


def run_lm_eval(base_url: str, model: str, tokenizer_dir: pathlib.Path, tasks: pathlib.Path):
    from lm_eval.tasks import TaskManager

    model_args = {
        "base_url": f"{base_url}/v1/completions",
        "model": model,
        "tokenizer_backend": "huggingface",
        "tokenizer": os.fspath(tokenizer_dir),
        "tokenized_requests": True,
        "max_retries": 1,
    }
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=os.fspath(tasks)),
        log_samples=True,
    )


def reference_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probabilities of each " choice" after the context, split into tokens the way
    lm-eval does (the whole text encoded, the context's tokens cut off)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    sums = []
    for choice in choices:
        ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]  # [num_tokens, vocab]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = range(len(context_ids), len(ids))
        sums.append(sum(float(logprobs[i - 1, ids[i]]) for i in targets))
    return sums


def test_lm_eval_loglikelihoods_match_transformers(
    float32_stack, hf_tokenizer_dir, reference, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    client = openai.OpenAI(base_url=f"{float32_stack.http_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    results = run_lm_eval(float32_stack.http_url, model, hf_tokenizer_dir, task_dir(tmp_path))
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(DOCS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    for doc, sample in zip(DOCS, samples, strict=True):
        ours = [float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = reference_loglikelihoods(reference, tokenizer, context, doc["choices"])
        assert ours == pytest.approx(expected, abs=ATOL), doc["question"]
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
