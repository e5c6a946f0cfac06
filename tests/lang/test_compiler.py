"""Compiled programs: the same results as interpreted ones (scripted backend, then a tiny real engine with greedy
decoding), the run_batch constant-prefix prefetch of both paths, and the opt-in hoisting pass."""

from __future__ import annotations

import pytest

import radixflow as sgl
from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.function import CompiledFunction
from radixflow.lang.graph import Kind
from tests.lang.scripted_backend import ScriptedBackend

pytestmark = pytest.mark.timeout(60)

TAGS = RoleTemplate({r: f"<{r[0]}>" for r in ("system", "user", "assistant")},
                    {r: f"</{r[0]}>" for r in ("system", "user", "assistant")})
INSTRUCTIONS = "You answer geography questions with one word, the name of a city, and nothing else.\n"


def backend() -> ScriptedBackend:
    """Answers name the prompt's end; select picks the choice whose first letter the prompt's length selects."""
    return ScriptedBackend(template=TAGS, choose=lambda prompt, choices: choices[len(prompt) % len(choices)])


@sgl.function
def few_shot_qa(s, question):
    s += INSTRUCTIONS + "Q: What is the capital of France?\nA: Paris\n"
    with s.var_scope("qa"):
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", stop="\n", max_tokens=8)


@sgl.function
def chat(s, question_1, question_2):
    s += sgl.system(INSTRUCTIONS)
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=16))
    with s.user():
        s += question_2
    with s.assistant():
        s += sgl.gen("answer_2", max_tokens=16)


@sgl.function
def capital(s, country, choices):
    s += f"Q: What is the capital of {country}?\nA: " + sgl.select("city", choices)
    s += "\nSure?" + sgl.select("sure", ["yes", "no"])


@sgl.function
def skeleton(s, topic, n):
    s += sgl.user(f"Give {n} tips for {topic}.")
    forks = s.fork(n)
    forks += lambda i: f"Tip {i + 1}:" + sgl.gen("detail", max_tokens=16, stop="\n\n")
    forks.join()
    s += f"Tips: {s['detail']}\nIn summary," + sgl.gen("summary", max_tokens=16)


@sgl.function
def ask(s, question):
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=4)


@sgl.function
def variables(s, name, width=6):
    ask(s, f"who is {name}?")
    s["note"] = "kept"
    s += f"\n[{s['answer']:>9}]" + " then " + s["answer"]
    forks = s.fork(2)
    forks += lambda i: f"/{i}" + forks[i]["answer"] + sgl.gen("leaf", max_tokens=3)
    s += "+parent"
    forks.join(mode="concate_and_append")
    with s.var_scope("tail"):
        s += " end:" + sgl.gen("end", max_tokens=width)


CASES = {
    "few_shot_qa": (few_shot_qa, {}, {"question": "What is the capital of Spain?"}),
    "chat": (chat, {}, {"question_1": "Capital of France?", "question_2": "And of Germany?"}),
    "select": (capital, {"choices": ["Paris", "Berlin", "Rome"]}, {"country": "France"}),
    "skeleton": (skeleton, {"n": 3}, {"topic": "sleep"}),
    "variables": (variables, {}, {"name": "Ann", "width": 9}),
}


def produced(compiled: CompiledFunction) -> set[str]:
    return {name for node in compiled.graph.stream_nodes(0) for name in node.produces}


def outcome(state, names) -> tuple:
    assert state.error() is None, state.error()
    return state.text(), {name: state[name] for name in sorted(names)}, state.messages()


def sorted_calls(b: ScriptedBackend) -> list:
    return sorted((kind, prompt, repr(extra)) for kind, prompt, extra in b.calls)


@pytest.mark.parametrize("case", CASES)
def test_compiled_run_gives_the_interpreted_results(case):
    function, fixed, arguments = CASES[case]
    compiled = function.compile(**fixed)
    interpreted_backend, compiled_backend = backend(), backend()
    expected = function.run(**fixed, **arguments, backend=interpreted_backend)
    state = compiled.run(**arguments, backend=compiled_backend)
    names = produced(compiled)
    assert names  # the comparison covers the program's variables
    assert outcome(state, names) == outcome(expected, names)
    assert sorted_calls(compiled_backend) == sorted_calls(interpreted_backend)  # same requests, same parameters


@pytest.mark.parametrize("case", ["few_shot_qa", "chat", "skeleton"])
def test_compiled_run_batch_gives_the_interpreted_results(case):
    function, fixed, arguments = CASES[case]
    batch = [{k: f"{v} #{i}" for k, v in arguments.items()} for i in range(4)]
    interpreted_backend, compiled_backend = backend(), backend()
    expected = function.run_batch([{**fixed, **kw} for kw in batch], backend=interpreted_backend, num_threads=4)
    compiled = function.compile(**fixed)
    states = compiled.run_batch(batch, backend=compiled_backend, num_threads=4)
    names = produced(compiled)
    assert [outcome(s, names) for s in states] == [outcome(s, names) for s in expected]
    assert sorted_calls(compiled_backend) == sorted_calls(interpreted_backend)


def test_compiled_function_takes_arguments_like_the_function():
    compiled = variables.compile()
    assert compiled.graph.parameters == ["name", "width"]
    b = backend()
    positional = compiled.run("Bo", 7, backend=b)
    assert positional.text() == variables.run("Bo", 7, backend=backend()).text()
    assert compiled.run(name="Bo", backend=b).text() == variables.run(name="Bo", backend=backend()).text()  # default
    assert compiled.bind(width=7).run(name="Bo", backend=b).text() == positional.text()
    tuples = compiled.run_batch([("Bo", 7), ("Cy", 7)], backend=b)
    assert tuples[0].text() == positional.text() and "Cy" in tuples[1].text()
    with pytest.raises(TypeError, match="'name'"):
        compiled.run(backend=b)
    fixed = skeleton.compile(n=2)
    with pytest.raises(TypeError, match="'topic'"):  # n was fixed when compiling; topic is still a parameter
        fixed.run(backend=b)


def test_arguments_in_generation_parameters_are_filled_in_per_run():
    @sgl.function
    def program(s, n, stop):
        s += "Count:" + sgl.gen("count", max_tokens=n, stop=[stop, "\n"])

    compiled = program.compile()
    b = backend()
    compiled.run_batch([{"n": 3, "stop": "x"}, {"n": 5, "stop": "y"}], backend=b)
    assert sorted((p["max_new_tokens"], tuple(p["stop"])) for p in b.params()) == [(3, ("x", "\n")),
                                                                                   (5, ("y", "\n"))]


def test_the_python_function_runs_only_when_compiling():
    calls = []

    @sgl.function
    def program(s, question):
        calls.append(question)
        s += "Q: " + question + sgl.gen("a")

    compiled = program.compile()
    assert len(calls) == 1  # the trace, with a placeholder
    compiled.run_batch([{"question": "a"}, {"question": "b"}], backend=backend())
    assert compiled.run(question="c", backend=backend())["a"] == "<Q: c>"
    assert len(calls) == 1
    assert compiled.run(question="c", backend=backend()).ret_value is None  # documented: no Python return value


def test_compiled_program_streams():
    state = few_shot_qa.compile().run(question="Why?", stream=True, backend=backend())
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text() and state["answer"] in pieces


def test_tracing_a_compiled_function_gives_back_its_graph():
    compiled = skeleton.compile(n=2)
    retraced = compiled.trace()
    assert [(n.kind, n.stream, n.deps, n.produces) for n in retraced] == \
           [(n.kind, n.stream, n.deps, n.produces) for n in compiled.graph]


def test_compiling_an_untraceable_program_raises_naming_the_variable():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.select("verdict", ["yes", "no"])
        if s["verdict"] == "yes":
            s += sgl.gen("why")

    with pytest.raises(sgl.TracingError, match="'verdict'"):
        program.compile()


# -- run_batch prefetch --------------------------------------------------------------------------------------------
def batch_prompts(b: ScriptedBackend) -> list[str]:
    return [prompt for kind, prompt, _ in b.calls if kind != "cache_prefix"]


def prefetches(b: ScriptedBackend) -> list[str]:
    return b.prompts("cache_prefix")


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_run_batch_prefetches_the_constant_prefix_once_before_the_programs(compiled):
    function = chat.compile() if compiled else chat
    b = backend()
    states = function.run_batch([{"question_1": f"Capital of country {i}?", "question_2": "Sure?"} for i in range(5)],
                                backend=b, num_threads=5)
    assert all(s.error() is None for s in states)
    prefix = f"<s>{INSTRUCTIONS}</s><u>"  # role markers rendered exactly as the interpreter renders them
    assert prefetches(b) == [prefix] and b.calls[0] == ("cache_prefix", prefix, None)
    sent = batch_prompts(b)
    assert len(sent) == 10 and all(prompt.startswith(prefix) for prompt in sent)
    assert all(s.text().startswith(prefix) for s in states)


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_run_batch_prefetch_covers_text_up_to_the_first_argument(compiled):
    function = few_shot_qa.compile() if compiled else few_shot_qa
    b = backend()
    function.run_batch([{"question": f"Question {i}?"} for i in range(3)], backend=b)
    prefix = INSTRUCTIONS + "Q: What is the capital of France?\nA: Paris\nQ: "
    assert prefetches(b) == [prefix] and all(p.startswith(prefix) for p in batch_prompts(b))


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreted", "compiled"])
def test_a_program_that_starts_with_an_argument_prefetches_nothing(compiled):
    @sgl.function
    def program(s, document):
        s += document + "\n" + INSTRUCTIONS + "Summary:" + sgl.gen("summary")

    function = program.compile() if compiled else program
    b = backend()
    function.run_batch([{"document": f"doc {i}"} for i in range(3)], backend=b)
    assert prefetches(b) == [] and len(batch_prompts(b)) == 3


def test_no_prefetch_for_one_program_or_a_short_prefix():
    b = backend()
    chat.run_batch([{"question_1": "a", "question_2": "b"}], backend=b)
    ask.run_batch([{"question": "a"}, {"question": "b"}], backend=b)  # "Q: " is not worth a request
    assert prefetches(b) == []


def test_prefetch_traces_up_to_the_first_value_the_program_needs():
    @sgl.function
    def react(s, question):
        s += INSTRUCTIONS + "Question: " + question + "\nAction:" + sgl.select("action", ["Search", "Finish"])
        if s["action"] == "Search":
            s += " [" + sgl.gen("query") + "]"

    @sgl.function
    def broken(s, question):
        raise KeyError("fails before appending anything")

    b = backend()
    states = react.run_batch([{"question": f"q{i}"} for i in range(3)], backend=b)
    assert all(s.error() is None for s in states)
    assert prefetches(b) == [INSTRUCTIONS + "Question: "]
    b = backend()
    with pytest.raises(KeyError):  # the programs' own error, as SGLang's run_batch raises it
        broken.run_batch([{"question": "a"}, {"question": "b"}], backend=b)
    assert prefetches(b) == []  # tracing stopped at the error before anything constant was appended


def test_prefetch_treats_arguments_shared_by_the_whole_batch_as_constant():
    @sgl.function
    def program(s, instructions, question, style="one word"):
        s += instructions + f"Answer in {style}.\n" + "Q: " + question + "\nA:" + sgl.gen("answer")

    b = backend()
    program.run_batch([{"instructions": INSTRUCTIONS, "question": f"q{i}"} for i in range(3)], backend=b)
    assert prefetches(b) == [INSTRUCTIONS + "Answer in one word.\nQ: "]  # shared value, and the default
    b = backend()
    program.run_batch([{"instructions": INSTRUCTIONS, "question": "q", "style": s} for s in ("a", "b")], backend=b)
    assert prefetches(b) == [INSTRUCTIONS + "Answer in "]


def test_a_failing_prefetch_does_not_take_the_batch_down():
    class Refusing(ScriptedBackend):
        def cache_prefix(self, text):
            raise ConnectionError("cache unavailable")

    states = few_shot_qa.run_batch([{"question": "a"}, {"question": "b"}], backend=Refusing())
    assert [s["answer"] for s in states] == [few_shot_qa.run(question=q, backend=backend())["answer"]
                                             for q in ("a", "b")]


# -- hoisting ----------------------------------------------------------------------------------------------------------
@sgl.function
def summarize(s, document, question):
    s += "Document: " + document + "\n"
    s += INSTRUCTIONS
    s += "Question: " + question + "\n"
    s += "Answer all questions from the document only.\n"
    s += sgl.user("Answer:") + sgl.gen("answer")
    s += "Unmoved constant text after the first role.\n"


def test_hoisting_moves_constant_statements_ahead_of_argument_dependent_ones():
    plain, hoisted = summarize.compile(), summarize.compile(hoist_constants=True)
    assert plain.graph.constant_prefix(TAGS) == "Document: "
    constant = INSTRUCTIONS + "Answer all questions from the document only.\n"
    assert hoisted.graph.constant_prefix(TAGS) == constant + "Document: "
    state = hoisted.run(document="D", question="Q?", backend=backend())
    assert state.text() == constant + "Document: D\nQuestion: Q?\n<u>Answer:</u>" + state["answer"] + \
        "Unmoved constant text after the first role.\n"
    assert hoisted.graph.kinds()[-4:] == plain.graph.kinds()[-4:]  # from the role on, nothing moved
    b = backend()
    hoisted.run_batch([{"document": f"D{i}", "question": "Q?"} for i in range(3)], backend=b)
    assert prefetches(b) == [constant + "Document: "]
    assert all(p.startswith(constant) for p in batch_prompts(b))
    assert all(n.deps == ((n.id - 1,) if n.id else ()) for n in hoisted.graph)  # edges derived again
    assert hoisted.graph.node(0).kind is Kind.TEXT


# -- a real engine -----------------------------------------------------------------------------------------------------
def test_compiled_equals_interpreted_on_a_tiny_engine_and_prefetch_hits_the_cache(tiny_engine):
    engine_backend = sgl.EngineBackend(tiny_engine)
    batch = [{"question_1": f"What is {i} plus {i}?", "question_2": "Are you sure?"} for i in range(4)]
    tiny_engine.flush_cache()
    expected = chat.run_batch(batch, temperature=0, backend=engine_backend)
    tiny_engine.flush_cache()
    compiled = chat.compile()
    states = compiled.run_batch(batch, temperature=0, backend=engine_backend)
    names = ["answer_1", "answer_2"]
    assert [outcome(s, names) for s in states] == [outcome(s, names) for s in expected]
    prefix = compiled.graph.constant_prefix(engine_backend.get_chat_template())
    assert prefix.startswith("<|im_start|>system\n" + INSTRUCTIONS) and all(s.text().startswith(prefix)
                                                                           for s in states)
    prefix_tokens = len(tiny_engine.tokenizer.encode(prefix))
    # The prefix was computed before the batch: every program's first request found it in the radix cache.
    assert all(s.get_meta_info("answer_1")["cached_tokens"] >= prefix_tokens - 1 for s in states)
    single = compiled.run(**batch[0], temperature=0, backend=engine_backend)
    assert outcome(single, names) == outcome(expected[0], names)
