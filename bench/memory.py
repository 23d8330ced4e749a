"""Memory benchmark: each process's resident memory (PSS: shared pages counted once, split
between the processes that map them), ours and llama-server's, after the same requests.

    python -m bench.memory --launch                                  # our default stack
    python -m bench.memory --launch --peer-bin /tmp/llama-peer/bin/llama-server

Our stack runs as `scripts/serve` would (plus any --launcher-args); the peer gets the same
GGUF with `-c` equal to our decode pool's tokens (equal KV capacity), `--parallel 16`, two
threads. Both are measured after start-up and after --requests chat requests of --max-tokens
tokens (greedy). Prints a table per process and writes bench/results/memory.json.
"""

import argparse
import json
import pathlib
import shlex
import subprocess
import time
from typing import Any

import httpx

from bench.serving import launched_stack, served_model
from services.engine.loader import resolve

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [f"Tell me about {topic}." for topic in ("the sea", "mountains", "rivers", "cities")]


def pss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for process {pid}")


def children(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def process_name(pid: int) -> str:
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [word.decode() for word in argv if word]
    if "-m" in words and words[words.index("-m") + 1].startswith(("services.", "frontend")):
        return words[words.index("-m") + 1].removeprefix("services.")
    return pathlib.Path(words[0]).name


def tree_pss(root_pid: int) -> dict[str, int]:
    """PSS of a process and its descendants, by name."""
    usage: dict[str, int] = {}
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        pending += children(pid)
        name = process_name(pid)
        usage[name] = usage.get(name, 0) + pss_bytes(pid)
    return usage


def launcher_pid(port: int) -> int:
    for cmdline in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.launcher" in words and str(port).encode() in words:
            return int(cmdline.parent.name)
    raise RuntimeError(f"no launcher on port {port}")


def chat(url: str, model: str, prompt: str, max_tokens: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()


def measure(url: str, root_pid: int, args: argparse.Namespace) -> dict[str, dict[str, int]]:
    model = served_model(url)
    started = tree_pss(root_pid)
    for i in range(args.requests):
        chat(url, model, PROMPTS[i % len(PROMPTS)], args.max_tokens)
    return {"after start": started, "after requests": tree_pss(root_pid)}


def decode_pool_tokens(url: str) -> int:
    """Our decode instances' KV capacity in tokens, from /metrics."""
    blocks = 0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("llmserve_kv_blocks_") and 'service="decode"' in line:
            blocks += int(float(line.split()[-1]))
    return blocks * 16


def run_peer(binary: str, gguf: pathlib.Path, context: int, args: argparse.Namespace):
    port = args.port + 1
    command = [binary, "-m", str(gguf), "-t", "2", "-c", str(context), "--parallel", "16"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {"LD_LIBRARY_PATH": str(pathlib.Path(binary).parent)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("llama-server did not start")
        return measure(url, process.pid, args)
    finally:
        process.terminate()
        process.wait(timeout=30)


def print_table(name: str, result: dict[str, dict[str, int]]) -> None:
    after = result["after requests"]
    print(f"{name}: PSS in MiB after start / after {len(after) and 'requests'}")
    for process in sorted(after, key=after.get, reverse=True):
        before = result["after start"].get(process, 0)
        print(f"  {process:14s} {before / 2**20:8.0f} {after[process] / 2**20:8.0f}")
    total_before = sum(result["after start"].values()) / 2**20
    print(f"  {'total':14s} {total_before:8.0f} {sum(after.values()) / 2**20:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch", action="store_true", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--port", type=int, default=8051, help="HTTP port (the peer's is +1)")
    parser.add_argument("--launcher-args", default="", help="more launcher arguments")
    parser.add_argument("--peer-bin", help="llama-server binary to measure beside ours")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results/memory.json")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with launched_stack(args.model, args.port, *shlex.split(args.launcher_args)) as url:
        results["ours"] = measure(url, launcher_pid(args.port), args)
        context = decode_pool_tokens(url)
    results["ours"]["decode pool tokens"] = context
    print_table(f"ours (decode pool {context} tokens)", results["ours"])
    if args.peer_bin:
        gguf = resolve(args.model).path
        results["llama-server"] = run_peer(args.peer_bin, gguf, context, args)
        print_table(f"llama-server -c {context}", results["llama-server"])
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
