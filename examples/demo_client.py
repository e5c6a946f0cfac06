"""A demo program against a running radixflow server (the README's main job runs it).

It uses the server the way users do: the official `openai` SDK for chat, structured output (a pydantic model as
`response_format`) and a tool call; the official `anthropic` SDK; an SGLang program on `sgl.OpenAI` with API
speculative execution; and the native /generate API for a few-shot batch whose shared prefix the radix cache
computes once.

    python examples/demo_client.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import time

import anthropic
import httpx
import openai
import pydantic

import radixflow as sgl

FEW_SHOT = """Classify the sentiment of each review as positive or negative.
Review: The food was wonderful and the staff were kind. Sentiment: positive
Review: Cold soup, rude waiter, never again. Sentiment: negative
Review: A delightful evening, we will be back. Sentiment: positive
Review: The room smelled and the bed was broken. Sentiment: negative
"""
REVIEWS = ["Absolutely loved the view and the breakfast.", "Terrible service and overpriced drinks.",
           "Great value, friendly people.", "The worst hotel I have stayed in.", "Lovely garden and quiet rooms.",
           "Dirty bathroom and noisy street."]


def chat(client: openai.OpenAI, model: str) -> None:
    print("== chat (openai SDK, streamed)")
    question = "Name three primary colors."
    print(f"user: {question}\nassistant: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            max_tokens=64, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    is_capital: bool


def structured(client: openai.OpenAI, model: str) -> None:
    print("\n== structured output (openai SDK, response_format = a pydantic model; always parses)")
    for text in ("Paris is the capital of France.", "Osaka is a large city in Japan, but not its capital."):
        out = client.chat.completions.parse(model=model, max_tokens=64, temperature=0, response_format=City,
                                            messages=[{"role": "user", "content": f"Extract the city as JSON. {text}"}])
        print(f"{text:55s} -> {out.choices[0].message.parsed!r}")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 40},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city"], "additionalProperties": False}}}


def tool_call(client: openai.OpenAI, model: str) -> None:
    print("\n== tool call (openai SDK, tool_choice=required: a valid call by construction)")
    out = client.chat.completions.create(model=model, max_tokens=64, temperature=0, tools=[WEATHER],
                                         tool_choice="required", parallel_tool_calls=False,
                                         messages=[{"role": "user", "content": "How warm is it in Lisbon?"}])
    call = out.choices[0].message.tool_calls[0]
    print(f"{call.function.name}({call.function.arguments})  finish_reason={out.choices[0].finish_reason}")


def messages_api(url: str, model: str) -> None:
    print("\n== Anthropic's Messages API (anthropic SDK, streamed)")
    client = anthropic.Anthropic(base_url=url, api_key="none")
    with client.messages.stream(model=model, max_tokens=48, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Give one tip for sleeping well."}]) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        usage = stream.get_final_message().usage
    print(f"\n(input {usage.input_tokens} tokens, {usage.cache_read_input_tokens} from the radix cache)")


@sgl.function(num_api_spec_tokens=48)
def character(s, example):
    s += f"Construct a character in this format:\n{example}\n\nAnother one:\n"
    s += "Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n") + "\n"


def program(url: str, model: str) -> None:
    print("\n== an SGLang program on sgl.OpenAI (completion mode, API speculative execution)")
    backend = sgl.OpenAI(model, is_chat_model=False, base_url=f"{url}/v1", api_key="none")
    state = character.run(example="Name: Marie Curie\nAge: 66\nJob: physicist", temperature=0,
                          max_new_tokens=16, backend=backend)
    print(f"name={state['name']!r} age={state['age']!r} job={state['job']!r}: "
          f"{backend.token_usage.calls} API call(s) for 3 fields")


def few_shot(url: str) -> None:
    print("\n== few-shot batch (native /generate; the shared prefix is computed once)")
    prompts = [f"{FEW_SHOT}Review: {r} Sentiment:" for r in REVIEWS]
    start = time.perf_counter()
    results = httpx.post(f"{url}/generate", timeout=300, json={
        "text": prompts, "sampling_params": {"max_new_tokens": 2, "temperature": 0, "stop": ["\n"]}}).json()
    elapsed = time.perf_counter() - start
    for review, result in zip(REVIEWS, results):
        meta = result["meta_info"]
        print(f"{review:48s} ->{result['text']:10s} (prompt {meta['prompt_tokens']}, cached {meta['cached_tokens']})")
    print(f"{len(prompts)} requests in {elapsed:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    model = client.models.list().data[0].id
    chat(client, model)
    structured(client, model)
    tool_call(client, model)
    messages_api(args.url, model)
    program(args.url, model)
    few_shot(args.url)
    info = httpx.get(f"{args.url}/get_server_info", timeout=30).json()["stats"]
    print(f"\nserver: cache hit rate {info['cache_hit_rate']:.0%}, {info['generated_tokens']} tokens generated")


if __name__ == "__main__":
    main()
