"""The workloads of the SGLang paper's evaluation, as radixflow programs over deterministic data (bench/suite/data.py).

Each `Workload` makes its program instances (`make(n, seed)` -> [(arguments, expected)]) and judges a finished
state (`correct(state, expected)`, for workloads with answers). Every generation is greedy, so every system computes
the same thing and accuracy can be compared across them. Sizes: the number of program instances in the full and
the `--quick` run.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import radixflow as sgl
from bench.suite import data


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    program: sgl.SglFunction
    make: Callable[[int, int], list[tuple[dict, object]]]
    sizes: tuple[int, int]  # (full, quick)
    prefix_heavy: bool  # the paper's claim for it: a radix cache should win big
    correct: Callable[[object, object], bool] | None = None
    uses: tuple[str, ...] = ()  # primitives a baseline may lack: select, fork, regex, json_schema, chat


# -- MMLU-style: 5-shot multiple choice, one generated token ------------------------------------------------------
def _mc_block(item: data.MultipleChoice) -> str:
    return item.question + "\n" + "".join(f"{ch}. {o}\n" for ch, o in zip(data.letters(4), item.options))


@cache
def _mmlu_prefix(subject: str) -> str:
    rng = random.Random(f"mmlu-shots-{subject}")
    make = data.mmlu_subjects()[subject]
    shots = [make(rng) for _ in range(5)]
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(_mc_block(s) + f"Answer: {data.letters(4)[s.answer]}\n\n" for s in shots)


@sgl.function
def mmlu(s, subject, question):
    s += _mmlu_prefix(subject) + question + "Answer:"
    s += sgl.gen("answer", max_tokens=1, temperature=0)


def _mmlu_make(n, seed):
    rng = random.Random(seed)
    subjects = data.mmlu_subjects()
    names = list(subjects)
    out = []
    for i in range(n):
        subject = names[i % len(names)]
        item = subjects[subject](rng)
        out.append(({"subject": subject, "question": _mc_block(item)}, data.letters(4)[item.answer]))
    return out


# -- HellaSwag-style: 20-shot select over 4 endings ---------------------------------------------------------------
@cache
def _hellaswag_prefix() -> str:
    rng = random.Random("hellaswag-shots")
    shots = [data.hellaswag_item(rng) for _ in range(20)]
    return "".join(f"{ctx} {endings[answer]}\n\n" for ctx, endings, answer in shots)


@sgl.function
def hellaswag(s, context, endings):
    s += _hellaswag_prefix() + context
    s += sgl.select("ending", choices=[" " + e for e in endings])


def _hellaswag_make(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx, endings, answer = data.hellaswag_item(rng)
        out.append(({"context": ctx, "endings": endings}, " " + endings[answer]))
    return out


# -- ReAct agent replaying fixed traces ---------------------------------------------------------------------------
REACT_PREFIX = """Solve a question answering task with interleaving Thought, Action, Observation steps. Thought can \
reason about the current situation, and Action can be three types:
(1) Search[entity], which searches the entity in the town register and returns its entry.
(2) Lookup[keyword], which returns the next sentence containing keyword in the current entry.
(3) Finish[answer], which returns the answer and finishes the task.
Here are some examples.

Question: What is the town whose mayor is Ilse Kasper best known for?
Thought 1: I need to find the town whose mayor is Ilse Kasper, then find what it is known for.
Action 1: Search[Ilse Kasper]
Observation 1: Ilse Kasper is the mayor of Dorselka, a town in the lake region.
Thought 2: The town is Dorselka. I need to search Dorselka and find what it is known for.
Action 2: Search[Dorselka]
Observation 2: Dorselka is a town in the lake region. About 12,400 people live there. Dorselka is best known for its \
honey.
Thought 3: Dorselka is best known for its honey. So the answer is honey.
Action 3: Finish[honey]

Question: Which region is the town that sells marble across the country in?
Thought 1: I need to search for the town known for marble, then find its region.
Action 1: Search[marble]
Observation 1: Galmorti is best known for its marble, which it sells across the country.
Thought 2: The town is Galmorti. I need to find its region.
Action 2: Lookup[region]
Observation 2: Galmorti is a town in the mountain region.
Thought 3: Galmorti is in the mountain region. So the answer is mountain.
Action 3: Finish[mountain]

"""


@sgl.function
def react(s, question, observations):
    s += REACT_PREFIX + f"Question: {question}\n"
    for i, observation in enumerate(observations, 1):
        s += f"Thought {i}:" + sgl.gen(f"thought_{i}", max_tokens=24, stop="\n", temperature=0)
        s += f"\nAction {i}:" + sgl.gen(f"action_{i}", max_tokens=12, stop="\n", temperature=0)
        s += f"\nObservation {i}: {observation}\n"  # the replayed trace, whatever the action was


def _react_make(n, seed):
    towns = data.corpus(64)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(towns)
        question = f"What is the town whose mayor is {t.mayor} best known for?"
        observations = [f"{t.mayor} is the mayor of {t.name}, a town in the {t.region} region.",
                        t.document(), f"{t.name} is best known for its {t.product}."]
        out.append(({"question": question, "observations": observations}, None))
    return out


# -- tree-of-thought: plan, execute, reflect, each forking 3 ways -------------------------------------------------
@sgl.function
def tree_of_thought(s, question):
    s += ("Work through the problem step by step. Propose plans, carry them out, and check the results.\n\n"
          f"Problem: {question}\n")
    plans = s.fork(3)
    plans += lambda i: f"Plan {i + 1}:" + sgl.gen("plan", max_tokens=16, stop="\n", temperature=0)
    runs = [plan.fork(3) for plan in plans]
    for group in runs:
        group += lambda i: f"\nExecution {i + 1}:" + sgl.gen("result", max_tokens=16, stop="\n", temperature=0)
    checks = [run.fork(3) for group in runs for run in group]
    for group in checks:
        group += lambda i: f"\nCheck {i + 1}: is this right?" + sgl.select("verdict", choices=[" yes", " no"])
    for group in [*checks, *runs, plans]:  # innermost first: a parent gathers its children's variables
        group.join()


def _tot_make(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(3, 30), rng.randint(3, 30), rng.randint(2, 9)
        out.append(({"question": f"A shop has {a} boxes with {c} apples each and sells {b} apples. "
                                 "How many apples are left?"}, None))
    return out


# -- skeleton-of-thought: outline, then expand the points in parallel ---------------------------------------------
@sgl.function
def skeleton_of_thought(s, topic):
    s += sgl.user(f"Give a numbered outline of 4 short points about {topic}.")
    s += sgl.assistant(sgl.gen("outline", max_tokens=48, temperature=0))
    points = s.fork(4)
    points += lambda i: (sgl.user(f"Expand point {i + 1} of the outline in two sentences.")
                         + sgl.assistant(sgl.gen("expansion", max_tokens=32, temperature=0)))
    points.join()


def _sot_make(n, seed):
    rng = random.Random(seed)
    return [({"topic": rng.choice(data.CHAT_TOPICS)}, None) for _ in range(n)]


# -- JSON extraction: a regex field and a JSON-schema record ------------------------------------------------------
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                  "city": {"type": "string"}},
                 "required": ["name", "age", "city"], "additionalProperties": False}


@cache
def _json_prefix() -> str:
    rng = random.Random("json-shots")
    shots = []
    for _ in range(3):
        p = data.person(rng)
        shots.append(f"Text: {p.bio(rng)}\nAge: {p.age}\nRecord: "
                     f'{{"name": "{p.name}", "age": {p.age}, "city": "{p.city}"}}\n\n')
    return "Extract the person's details from each text as JSON.\n\n" + "".join(shots)


@sgl.function
def json_extraction(s, text):
    s += _json_prefix() + f"Text: {text}\nAge: "
    s += sgl.gen("age", max_tokens=4, regex=r"[0-9]{1,3}", temperature=0)
    s += "\nRecord: " + sgl.gen("record", max_tokens=48, json_schema=PERSON_SCHEMA, temperature=0)


def _json_make(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = data.person(rng)
        out.append(({"text": p.bio(rng)}, p))
    return out


def _json_correct(state, person) -> bool:
    import json

    try:
        record = json.loads(state["record"])
    except (ValueError, TypeError):
        return False
    return (str(state["age"]).strip() == str(person.age) and record.get("name") == person.name
            and record.get("age") == person.age and record.get("city") == person.city)


# -- multi-turn chat, short and long answers ----------------------------------------------------------------------
def _chat(max_tokens: int):
    @sgl.function
    def chat(s, opening, follow_ups):
        s += sgl.system("You are a helpful assistant.")
        for question in [opening, *follow_ups]:
            s += sgl.user(question)
            s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))

    return chat


def _chat_make(n, seed):
    rng = random.Random(seed)
    return [({"opening": f"I want some advice on {rng.choice(data.CHAT_TOPICS)}.",
              "follow_ups": rng.sample(data.FOLLOW_UPS, 3)}, None) for _ in range(n)]


# -- an agent loop with tool pauses and a growing history ---------------------------------------------------------
AGENT_SYSTEM = """You are an operations agent for a town register. You can call these tools, one per line:
lookup_town(name) -> the register entry of a town
list_towns(region) -> the towns of a region
population(name) -> the population of a town
send_report(text) -> files a report and ends the task
Think briefly, then write exactly one tool call. The tool's result follows as "Result:". Keep going until the task \
is done, then call send_report."""
TOOL_PAUSE_S = 0.05  # a tool call's latency; the program sleeps, as an agent waits for its tool


@sgl.function
def agent_loop(s, task, results):
    s += sgl.system(AGENT_SYSTEM)
    s += sgl.user(task)
    for i, result in enumerate(results):
        s += sgl.assistant(sgl.gen(f"call_{i}", max_tokens=20, stop="\n", temperature=0))
        time.sleep(TOOL_PAUSE_S)
        s += sgl.user(f"Result: {result}")


def _agent_make(n, seed):
    towns = data.corpus(64)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        region = rng.choice(data.REGIONS)
        members = [t for t in towns if t.region == region] or towns[:3]
        results = [", ".join(t.name for t in members[:6])] + [t.document() for t in members[:4]] + ["Report filed."]
        out.append(({"task": f"Write a report on the largest towns of the {region} region.", "results": results},
                    None))
    return out


# -- RAG: BM25 over a local corpus, then answer -------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@cache
def _retriever():
    from rank_bm25 import BM25Okapi

    towns = data.corpus(400)
    return BM25Okapi([_words(t.document()) for t in towns]), towns


def retrieve(question: str, k: int = 3) -> list[str]:
    bm25, towns = _retriever()
    scores = bm25.get_scores(_words(question))
    best = sorted(range(len(towns)), key=lambda i: -scores[i])[:k]
    return [towns[i].document() for i in best]


@sgl.function
def rag(s, town):
    question = f"What is {town} best known for?"
    context = "\n".join(f"- {doc}" for doc in retrieve(question))
    s += ("Answer the question using only the documents below.\n\n"
          f"Documents:\n{context}\n\nQuestion: {question}\nAnswer: {town} is best known for its")
    s += sgl.gen("answer", max_tokens=8, stop=["\n", "."], temperature=0)


def _rag_make(n, seed):
    towns = data.corpus(400)
    rng = random.Random(seed)
    return [({"town": t.name}, t.product) for t in (rng.choice(towns) for _ in range(n))]


WORKLOADS = [
    Workload("mmlu", "MMLU-style 5-shot", mmlu, _mmlu_make, (128, 8), True,
             lambda st, ans: st["answer"].strip() == ans),
    Workload("hellaswag", "HellaSwag-style 20-shot select", hellaswag, _hellaswag_make, (64, 4), True,
             lambda st, ans: st["ending"] == ans, uses=("select",)),
    Workload("react", "ReAct agent", react, _react_make, (32, 2), True),
    Workload("tree_of_thought", "tree-of-thought", tree_of_thought, _tot_make, (8, 1), True,
             uses=("fork", "select")),
    Workload("skeleton_of_thought", "skeleton-of-thought", skeleton_of_thought, _sot_make, (16, 2), False,
             uses=("fork", "chat")),
    Workload("json_extraction", "JSON extraction (regex, schema)", json_extraction, _json_make, (32, 4), False,
             _json_correct, uses=("regex", "json_schema")),
    Workload("chat_short", "multi-turn chat, short", _chat(16), _chat_make, (32, 2), True, uses=("chat",)),
    Workload("chat_long", "multi-turn chat, long", _chat(96), _chat_make, (16, 1), True, uses=("chat",)),
    Workload("agent_loop", "agent loop with tool pauses", agent_loop, _agent_make, (16, 1), True, uses=("chat",)),
    Workload("rag", "RAG (BM25 retrieval)", rag, _rag_make, (64, 4), False,
             lambda st, product: product in st["answer"].lower()),
]
BY_NAME = {w.name: w for w in WORKLOADS}
