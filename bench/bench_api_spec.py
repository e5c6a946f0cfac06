"""API speculative execution (issue: API model backends): the SGLang paper's character program with several `gen`
fields, on `sgl.OpenAI` pointed at a radixflow server on the embedded SmolLM2, with and without
`num_api_spec_tokens`, in completion mode and on the chat path (OpenAI chat, and Anthropic's /v1/messages).

    python -m bench.bench_api_spec [--programs 16] [--spec-tokens 64] [--json out.json]

Each program describes a different example person and asks for a new one; every program runs on its own (calls
counted per program), greedy. Reported per mode: API calls, prompt and completion tokens, wall time, the share of
programs whose speculation matched (one call filled every field), and whether the fields equal normal execution's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import httpx

import radixflow as sgl
from radixflow.lang.chat_template import get_chat_template

PEOPLE = [("Steve Jobs", "February 24, 1955", "Apple CEO"), ("Marie Curie", "November 7, 1867", "physicist"),
          ("Ada Lovelace", "December 10, 1815", "mathematician"), ("Pele", "October 23, 1940", "footballer"),
          ("Frida Kahlo", "July 6, 1907", "painter"), ("Alan Turing", "June 23, 1912", "computer scientist"),
          ("Serena Williams", "September 26, 1981", "tennis player"), ("Nelson Mandela", "July 18, 1918",
                                                                      "president"),
          ("Jane Austen", "December 16, 1775", "novelist"), ("Yuri Gagarin", "March 9, 1934", "cosmonaut"),
          ("Coco Chanel", "August 19, 1883", "fashion designer"), ("Louis Armstrong", "August 4, 1901",
                                                                    "trumpeter"),
          ("Rosalind Franklin", "July 25, 1920", "chemist"), ("Bruce Lee", "November 27, 1940", "martial artist"),
          ("Greta Garbo", "September 18, 1905", "actress"), ("Nikola Tesla", "July 10, 1856", "inventor")]
FIELDS = ("name", "birthday", "job")


def completion_program(s, name, birthday, job):
    s += "Construct a character within the following format:\n"
    s += f"Name: {name}.\nBirthday: {birthday}.\nJob: {job}.\n"
    s += "\nPlease generate new Name, Birthday and Job.\n"
    s += "Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n") + "\n"


def chat_program(s, name, birthday, job):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user("Construct a character within the following format:")
    s += sgl.assistant(f"Name: {name}.\nBirthday: {birthday}.\nJob: {job}.\n")
    s += sgl.user("Please generate new Name, Birthday and Job.\n")
    s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
                       + "\nJob:" + sgl.gen("job", stop="\n"))


def measure(backend, body, people, spec_tokens) -> tuple[dict, list]:
    program = sgl.function(num_api_spec_tokens=spec_tokens)(body) if spec_tokens else sgl.function(body)
    calls, values, prompt, completion = [], [], 0, 0
    start = time.perf_counter()
    for name, birthday, job in people:
        backend.token_usage.reset()
        state = program.run(name=name, birthday=birthday, job=job, temperature=0, max_new_tokens=32,
                            backend=backend)
        assert state.error() is None, state.error()
        values.append([state[f] for f in FIELDS])
        calls.append(backend.token_usage.calls)
        prompt += backend.token_usage.prompt_tokens
        completion += backend.token_usage.completion_tokens
    return {"calls": sum(calls), "prompt_tokens": prompt, "completion_tokens": completion,
            "seconds": time.perf_counter() - start, "matched": sum(c == 1 for c in calls) / len(calls)}, values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs", type=int, default=16)
    parser.add_argument("--spec-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    people = (PEOPLE * (args.programs // len(PEOPLE) + 1))[: args.programs]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "programs": args.programs, "spec_tokens": args.spec_tokens}
    # fp32 weights: batch-invariant, so a value that differs from normal execution differs because of speculation
    # (the default int4 kernel can flip bf16 near-ties between batch shapes and cache hits).
    with sgl.Runtime(num_threads=2, weight_format="fp32") as runtime:
        model = httpx.get(f"{runtime.url}/v1/models", timeout=10).json()["data"][0]["id"]
        modes = {
            "completion (OpenAI, chatml text)": (sgl.OpenAI(model, is_chat_model=False, base_url=f"{runtime.url}/v1",
                                                            api_key="none",
                                                            chat_template=get_chat_template("chatml")),
                                                 completion_program),
            "chat (OpenAI)": (sgl.OpenAI(model, base_url=f"{runtime.url}/v1", api_key="none",
                                         sglang_extensions=True), chat_program),
            "chat (Anthropic /v1/messages)": (sgl.Anthropic(model, base_url=runtime.url, api_key="none"),
                                              chat_program),
        }
        for mode, (backend, body) in modes.items():
            measure(backend, body, people[:1], None)  # warm-up
            plain, plain_values = measure(backend, body, people, None)
            spec, spec_values = measure(backend, body, people, args.spec_tokens)
            same = sum(a == b for a, b in zip(plain_values, spec_values)) / len(people)
            results[mode] = {"plain": plain, "speculative": spec, "same_values": same,
                             "calls_ratio": plain["calls"] / spec["calls"],
                             "prompt_tokens_ratio": plain["prompt_tokens"] / spec["prompt_tokens"]}
            print(f"{mode}: calls {plain['calls']} -> {spec['calls']} ({plain['calls'] / spec['calls']:.2f}x fewer), "
                  f"prompt tokens {plain['prompt_tokens']} -> {spec['prompt_tokens']} "
                  f"({plain['prompt_tokens'] / spec['prompt_tokens']:.2f}x), completion tokens "
                  f"{plain['completion_tokens']} -> {spec['completion_tokens']}, time {plain['seconds']:.1f} s -> "
                  f"{spec['seconds']:.1f} s; speculation matched in {spec['matched']:.0%} of programs; "
                  f"values equal to normal execution in {same:.0%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
