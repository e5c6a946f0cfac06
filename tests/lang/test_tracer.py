"""Tracing (no backend, nothing runs): the graph of paper-style programs, its edges, fork structure, placeholders,
the constant prefix, and the programs that cannot be traced."""

from __future__ import annotations

from itertools import pairwise

import pytest

import radixflow as sgl
from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.graph import ArgumentUse, Kind, TracingError, VariableUse
from radixflow.lang.tracer import trace_program
from tests.lang.programs import two_turns  # the multi-turn program the suite runs on real backends

TAGS = RoleTemplate({r: f"<{r[0]}>" for r in ("system", "user", "assistant")},
                    {r: f"</{r[0]}>" for r in ("system", "user", "assistant")})


def chain(graph, stream=0) -> bool:
    """Every node of the stream depends on the one before it."""
    nodes = graph.stream_nodes(stream)
    return all(prev.id in node.deps for prev, node in pairwise(nodes))


# -- paper-style programs -------------------------------------------------------------------------------------------
@sgl.function
def few_shot_qa(s, question):
    s += "The following are questions with answers.\n\n"
    s += "Q: What is the capital of France?\nA: Paris\n"
    with s.var_scope("qa"):
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", stop="\n", max_tokens=8)


def test_few_shot_qa_graph():
    graph = few_shot_qa.trace()
    assert graph.parameters == ["question"] and graph.stopped is None
    assert graph.kinds() == ["text", "text", "var_scope_begin", "text", "argument", "text", "text", "gen",
                             "var_scope_end"]
    argument, gen, scope_end = graph.node(4), graph.node(7), graph.node(8)
    assert argument.payload == ArgumentUse("question")  # appended as a node, not formatted
    assert gen.payload.name == "answer" and gen.payload.params["max_new_tokens"] == 8 and gen.produces == ("answer",)
    assert scope_end.produces == ("qa",)
    assert graph.node(0).deps == () and chain(graph)
    assert [n.id for n in graph.deps(argument)] == [3]
    assert {n.stream for n in graph} == {0}


def test_given_arguments_are_traced_as_constants():
    graph = few_shot_qa.trace(question="Why?")
    assert graph.parameters == [] and graph.bound == {"question": "Why?"}
    assert Kind.ARGUMENT not in graph.kinds()
    assert "".join(n.payload.value for n in graph.stream_nodes() if n.kind is Kind.TEXT).endswith("Q: Why?\nA:")
    assert few_shot_qa.bind(question="Why?").trace().parameters == []


def test_multi_turn_chat_graph_keeps_roles_symbolic():
    graph = two_turns.trace()
    middles = ["text", "argument", "gen", "argument", "gen"]
    assert graph.kinds() == [kind for middle in middles for kind in ("role_begin", middle, "role_end")]
    roles = [n.payload.role for n in graph if n.kind is Kind.ROLE_BEGIN]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert [n.payload.role for n in graph if n.kind is Kind.ROLE_END] == roles
    assert [n.payload.name for n in graph if n.kind is Kind.ARGUMENT] == ["question_1", "question_2"]
    assert chain(graph)


@sgl.function
def capital(s, choices):
    s += "Q: What is the capital of France?\nA: "
    s += sgl.select("city", choices)


def test_select_needs_its_choices_concrete():
    graph = capital.trace(choices=["Paris", "London"])
    assert graph.kinds() == ["text", "select"]
    assert graph.node(1).payload.choices == ["Paris", "London"] and graph.node(1).produces == ("city",)
    with pytest.raises(TracingError, match="argument 'choices'.*fn.trace\\(choices=...\\)"):
        capital.trace()


@sgl.function
def skeleton_of_thought(s, topic, n):
    s += f"Act as a helpful assistant.\nUSER: Give some tips for {topic}.\n"
    s += f"ASSISTANT: Okay. Here are {n} concise tips:\n"
    forks = s.fork(n)
    forks += lambda i: f"Now, I expand tip {i + 1}:" + sgl.gen("detail", max_tokens=16, stop="\n\n")
    forks.join()
    s += f"Details: {s['detail']}\n"  # after gather_variable, a list of the children's values
    s += "\nIn summary," + sgl.gen("summary", max_tokens=16, stop="\n")


def test_skeleton_of_thought_fork_and_join_structure():
    graph = skeleton_of_thought.trace(n=3)
    assert graph.parameters == ["topic"]
    main = graph.stream_nodes(0)
    assert [str(n.kind) for n in main] == ["text", "argument", "text", "text", "fork", "join", "text", "variable",
                                          "text", "text", "gen"]
    topic = main[1]
    assert topic.payload == ArgumentUse("topic", "")  # formatted into the f-string
    fork, join = main[4], main[5]
    assert fork.payload.size == 3 and len(fork.payload.children) == 3
    for child in fork.payload.children:
        nodes = graph.stream_nodes(child)
        assert [str(n.kind) for n in nodes] == ["text", "gen"]
        assert nodes[0].deps == (fork.id,)  # a child starts from the parent's prefix at the fork
        assert nodes[1].deps == (nodes[0].id,)
        assert nodes[1].id in join.deps  # the join waits for every child's last node
        assert graph.streams[child] == fork.id
    assert fork.id in join.deps and join.produces == ("detail",)
    assert main[6].deps == (join.id,) and join.id in main[7].deps  # the gathered variable comes from the join


def test_symbolic_fork_size_names_the_argument():
    with pytest.raises(TracingError, match="argument 'n'.*integer"):
        skeleton_of_thought.trace()


def test_variables_read_back_depend_on_their_producer():
    @sgl.function
    def program(s, name):
        s += "Name: " + name + "\nNick:" + sgl.gen("nick", max_tokens=4)
        s += "\nYou said " + s["nick"]
        s += f" ({s['nick']:>6})" + sgl.gen("reply")

    graph = program.trace()
    kinds = graph.kinds()
    assert kinds == ["text", "argument", "text", "gen", "text", "variable", "text", "variable", "text", "gen"]
    gen = graph.node(3)
    appended, formatted = graph.node(5), graph.node(7)
    assert appended.payload == VariableUse("nick", 0, None) and set(appended.deps) == {4, gen.id}
    assert formatted.payload == VariableUse("nick", 0, ">6") and gen.id in formatted.deps


def test_fork_children_see_parent_variables_and_the_parent_reads_a_childs():
    @sgl.function
    def program(s):
        s += "P" + sgl.gen("base")
        forks = s.fork(2)
        forks += lambda i: f"/{i}" + forks[i]["base"] + sgl.gen("leaf")
        s += forks[1]["leaf"]
        forks.join(mode="concate_and_append")

    graph = program.trace()
    base = graph.node(1)
    child_reads = [n for n in graph if n.kind is Kind.VARIABLE and n.stream != 0]
    assert [n.payload.source for n in child_reads] == [1, 2] and all(base.id in n.deps for n in child_reads)
    parent_read = next(n for n in graph if n.kind is Kind.VARIABLE and n.stream == 0)
    leaf_of_second = next(n for n in graph.stream_nodes(2) if n.kind is Kind.GEN)
    assert parent_read.payload == VariableUse("leaf", 2, None) and leaf_of_second.id in parent_read.deps
    join = graph.stream_nodes(0)[-1]
    assert join.kind is Kind.JOIN and join.payload.mode == "concate_and_append" and join.produces == ()


def test_set_var_and_nested_functions_are_recorded():
    @sgl.function
    def ask(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=4)

    @sgl.function
    def program(s, first):
        ask(s, first)
        s["note"] = "kept"
        ask(s, "again after " + s["answer"] + "?")

    graph = program.trace()
    assert graph.kinds() == ["text", "argument", "text", "gen", "set_var", "text", "text", "variable", "text",
                             "text", "gen"]
    assert graph.node(4).produces == ("note",) and graph.node(4).payload.value == "kept"
    assert graph.node(1).payload.name == "first"  # the outer argument, passed through the nested call
    assert graph.node(3).id in graph.node(7).deps


# -- what cannot be traced --------------------------------------------------------------------------------------------
@sgl.function
def branchy(s, question):
    s += "Q: " + question + "\nA:" + sgl.select("verdict", ["yes", "no"])
    if s["verdict"] == "yes":
        s += " Why?" + sgl.gen("why")


@pytest.mark.parametrize("use", [
    lambda s: s["verdict"] == "yes",
    lambda s: bool(s["verdict"]),
    lambda s: "y" in s["verdict"],
    lambda s: list(s["verdict"]),
    lambda s: len(s["verdict"]),
    lambda s: s["verdict"].strip(),
    lambda s: int(s["verdict"]),
    lambda s: str(s["verdict"])[:3] + "",
], ids=["eq", "bool", "contains", "iter", "len", "method", "int", "sliced"])
def test_using_a_generated_value_in_python_raises_naming_the_variable(use):
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("verdict")
        s += use(s)

    with pytest.raises(TracingError, match="'verdict'|converted to str"):
        program.trace()


def test_appending_a_variable_nothing_produces_raises():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("answer")
        s += s["anwser"]  # a typo

    with pytest.raises(TracingError, match="'anwser' is appended before anything produces it"):
        program.trace()


def test_data_dependent_control_flow_stops_the_trace():
    with pytest.raises(TracingError, match="variable 'verdict' in Python \\(==\\)"):
        branchy.trace()


def test_a_caught_tracing_error_still_stops_the_trace_there():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("x")
        try:
            if s["x"]:
                s += "yes"
        except Exception:  # noqa: BLE001, S110 - what a careless program might do
            pass
        s += "after"

    with pytest.raises(TracingError, match="'x'"):
        program.trace()
    partial = trace_program(program.func, {}, partial=True)
    assert partial.kinds() == ["text", "gen"] and isinstance(partial.stopped, TracingError)


@pytest.mark.parametrize("use, operation", [
    (lambda q: q.upper(), ".upper"), (lambda q: len(q), "len"), (lambda q: q + 1, "\\+ int"),
    (lambda q: q if q else "", "truth"),
])
def test_using_an_argument_as_a_value_raises_naming_it(use, operation):
    @sgl.function
    def program(s, question):
        s += use(question)

    with pytest.raises(TracingError, match=f"argument 'question' .*{operation}"):
        program.trace()


def test_a_symbolic_format_spec_names_the_argument():
    @sgl.function
    def program(s, name, width):
        s += f"[{name:>{width}}]"

    with pytest.raises(TracingError, match="argument 'width' .*format spec"):
        program.trace()
    assert program.trace(width=5).node(1).payload == ArgumentUse("name", ">5")


@pytest.mark.parametrize("read", [lambda s: s.text(), lambda s: s.messages(), lambda s: s.get_meta_info("x"),
                                  lambda s: "x" in s], ids=["text", "messages", "meta_info", "contains"])
def test_reading_the_state_while_tracing_raises(read):
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("x")
        read(s)

    with pytest.raises(TracingError, match="exists only when the program runs"):
        program.trace()


# -- prefix and display ---------------------------------------------------------------------------------------------
def test_constant_prefix_renders_roles_with_the_template_and_stops_at_the_first_argument():
    assert two_turns.trace().constant_prefix(TAGS) == "<s>You are a helpful assistant.</s><u>"
    assert two_turns.trace().constant_prefix(RoleTemplate.plain()) == "System: You are a helpful assistant.\nUser: "
    expected = "The following are questions with answers.\n\nQ: What is the capital of France?\nA: Paris\nQ: "
    assert few_shot_qa.trace().constant_prefix(TAGS) == expected  # var_scope adds no text
    assert few_shot_qa.trace(question="Why?").constant_prefix(TAGS) == expected + "Why?\nA:"  # up to the gen
    assert skeleton_of_thought.trace(n=2, topic="x").constant_prefix(TAGS).endswith("Here are 2 concise tips:\n")


def test_pretty_shows_ids_streams_kinds_and_edges():
    text = str(skeleton_of_thought.trace(n=2))
    assert text.splitlines()[0] == "skeleton_of_thought(topic)"
    assert "#1   s0  argument        {topic}  <- #0" in text
    assert "#4   s0  fork            2 -> streams s1, s2  <- #3" in text
    assert "#5   s1  text            'Now, I expand tip 1:'  <- #4" in text
    assert "join            gather_variable <- streams s1, s2  -> detail  <- #4, #6, #8" in text
