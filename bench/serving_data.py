"""Workloads for the serving benchmark: ShareGPT conversations and a generated shared-prefix set.

Each workload is a list of `BenchRequest`s: token ids plus an exact output length. Both the server and the offline
engine run with `ignore_eos` and `max_new_tokens` = that length, so both sides generate the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from radixflow.tools.sharegpt import first_exchange, iter_records, sharegpt_path

LOWEST_ID = 100  # SmolLM2's special tokens sit below this; random prompts stay clear of them


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class ShareGPTSpec:
    num_requests: int
    min_len: int = 4  # bounds for both the prompt and the reference answer, as in SGLang's bench_serving
    max_prompt_len: int = 1024
    max_output_len: int = 256
    output_cap: int = 128  # keeps a CPU run short; longer reference answers are cut to this many tokens


@dataclass(frozen=True)
class SharedPrefixSpec:
    groups: int
    prompts_per_group: int
    system_len: int = 512
    question_len: int = 32
    output_len: int = 32


# -- ShareGPT ----------------------------------------------------------------------------------------------------
def sharegpt_requests(tokenizer, spec: ShareGPTSpec, seed: int) -> list[BenchRequest]:
    """`num_requests` first exchanges drawn in a seeded random order; the prompt is the human turn's tokens, the
    output length the gpt answer's token count (within the spec's bounds, then capped)."""
    exchanges = [ex for ex in map(first_exchange, iter_records(sharegpt_path())) if ex is not None]
    random.Random(seed).shuffle(exchanges)
    requests = []
    for prompt, answer in exchanges:  # tokenizing lazily: only as many as the sample needs
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_len = len(tokenizer.encode(answer, add_special_tokens=False))
        if spec.min_len <= len(prompt_ids) <= spec.max_prompt_len and spec.min_len <= answer_len <= spec.max_output_len:
            requests.append(BenchRequest(prompt_ids, min(answer_len, spec.output_cap)))
            if len(requests) == spec.num_requests:
                return requests
    raise SystemExit(f"ShareGPT has only {len(requests)} exchanges within the bounds; {spec.num_requests} asked")


# -- shared prefix -----------------------------------------------------------------------------------------------
def shared_prefix_requests(vocab_size: int, spec: SharedPrefixSpec, seed: int) -> list[BenchRequest]:
    """`groups` system prompts of random tokens, each followed by `prompts_per_group` random questions. The order
    is shuffled so the groups interleave in arrival, as independent users' requests would."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(LOWEST_ID, vocab_size) for _ in range(n)]

    requests = []
    for _ in range(spec.groups):
        system = tokens(spec.system_len)
        requests += [BenchRequest(system + tokens(spec.question_len), spec.output_len)
                     for _ in range(spec.prompts_per_group)]
    rng.shuffle(requests)
    return requests
