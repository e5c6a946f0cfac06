"""Tool calling (issue: tool calling and reasoning output) on the embedded SmolLM2, through the `openai` SDK
against `radixflow serve`.

    python -m bench.bench_tools [--prompts 16] [--json out.json]

  validity  4 tool sets x N prompts: the share of `required` and named (`tool_choice` naming a function) answers
            whose calls parse and validate against their schemas (jsonschema), and for `auto` the share of answers
            that start a call and the share of those that are valid
  cost      time per output token of a required tool call against an unconstrained answer of the same number of
            tokens (EOS ignored), one request at a time
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai

import radixflow as sgl


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


CITY = {"type": "string", "maxLength": 24}
TOOL_SETS = {
    "weather": ([function("get_weather", "Current weather in a city.", {"city": CITY, "unit": {
        "enum": ["celsius", "fahrenheit"]}}, ["city"]), function("get_time", "Local time in a city.", {"city": CITY},
                                                                  ["city"])],
                lambda i, x: f"What is the weather like in {x} right now?"),
    "math": ([function("calculate", "Evaluate an arithmetic expression.", {"expression": {
        "type": "string", "maxLength": 40}}, ["expression"])],
             lambda i, x: f"What is {i + 12} times {i * 7 + 3}?"),
    "search": ([function("web_search", "Search the web.", {"query": {"type": "string", "maxLength": 60},
                                                           "results": {"type": "integer", "minimum": 1,
                                                                       "maximum": 10}}, ["query"]),
                function("open_page", "Open a web page.", {"url": {"type": "string", "maxLength": 80}}, ["url"])],
               lambda i, x: f"Find recent news about {x}."),
    "calendar": ([function("create_event", "Add an event to the calendar.", {
        "title": {"type": "string", "maxLength": 40}, "day": {"type": "integer", "minimum": 1, "maximum": 31},
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}}, ["title", "day", "hour"])],
                 lambda i, x: f"Book a meeting about {x} on day {i + 1} at {9 + i % 8} o'clock."),
}
TOPICS = ["Paris", "Tokyo", "Lima", "Nairobi", "Oslo", "Cairo", "Sydney", "Toronto", "Berlin", "Delhi", "Rome",
          "Seoul", "Madrid", "Quito", "Hanoi", "Dakar"]


def validity(sdk, model: str, prompts: int) -> dict:
    jobs = []
    for set_name, (tools, ask) in TOOL_SETS.items():
        for i in range(prompts):
            messages = [{"role": "user", "content": ask(i, TOPICS[i % len(TOPICS)])}]
            named = {"type": "function", "function": {"name": tools[i % len(tools)]["function"]["name"]}}
            for mode, choice in (("required", "required"), ("named", named), ("auto", "auto")):
                jobs.append((set_name, mode, tools, messages, choice))

    def run(job):
        set_name, mode, tools, messages, choice = job
        out = sdk.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=choice,
                                          max_tokens=128, temperature=0, parallel_tool_calls=False)
        return mode, tools, out.choices[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    counts = {mode: {"answers": 0, "with_call": 0, "valid": 0} for mode in ("required", "named", "auto")}
    for mode, tools, choice in results:
        c = counts[mode]
        c["answers"] += 1
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        calls = choice.message.tool_calls or []
        if calls:
            c["with_call"] += 1
            try:
                for call in calls:
                    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
                c["valid"] += choice.finish_reason == "tool_calls"
            except (json.JSONDecodeError, jsonschema.ValidationError, KeyError):
                pass
    return counts


def cost(sdk, model: str, reps: int = 5) -> dict:
    tools, ask = TOOL_SETS["calendar"]
    messages = [{"role": "user", "content": ask(3, "the budget")}]
    sdk.chat.completions.create(model=model, messages=messages, max_tokens=4)  # warm-up, prompt cached both ways
    tool_s, tool_tokens, text_s = [], 0, []
    for _ in range(reps):
        start = time.perf_counter()
        out = sdk.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                          max_tokens=128, temperature=0, parallel_tool_calls=False)
        tool_s.append(time.perf_counter() - start)
        tool_tokens = out.usage.completion_tokens
    for _ in range(reps):
        start = time.perf_counter()
        sdk.chat.completions.create(model=model, messages=messages, max_tokens=tool_tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
        text_s.append(time.perf_counter() - start)
    tool_ms, text_ms = min(tool_s) / tool_tokens * 1000, min(text_s) / tool_tokens * 1000
    return {"tokens": tool_tokens, "tool_call_ms_per_token": tool_ms, "text_ms_per_token": text_ms,
            "ratio": tool_ms / text_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16, help="prompts per tool set")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with sgl.Runtime(num_threads=2) as runtime:
        sdk = openai.OpenAI(base_url=f"{runtime.url}/v1", api_key="none", timeout=300)
        model = httpx.get(f"{runtime.url}/v1/models", timeout=10).json()["data"][0]["id"]
        results = {"commit": commit, "validity": validity(sdk, model, args.prompts), "cost": cost(sdk, model)}
    for mode, c in results["validity"].items():
        print(f"{mode}: {c['answers']} answers, {c['with_call']} with a call, {c['valid']} valid "
              f"({c['valid'] / max(c['with_call'], 1):.0%} of those with a call)")
    k = results["cost"]
    print(f"cost: a {k['tokens']}-token tool call {k['tool_call_ms_per_token']:.1f} ms/token vs an unconstrained "
          f"answer {k['text_ms_per_token']:.1f} ms/token ({k['ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
