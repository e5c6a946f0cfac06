"""Interpreter semantics with scripted backends (no model): ordering, blocking reads, fork/join, roles, scopes,
errors, streaming, composition; and the three choice methods on hand-made logprobs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import radixflow as sgl
from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.interpreter import ProgramError
from tests.lang.scripted_backend import WAIT_S, BarrierBackend, ChunkedBackend, GatedBackend, ScriptedBackend, echo

pytestmark = pytest.mark.timeout(60)  # a deadlocked interpreter fails the test instead of the whole run


def run_in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


# -- text, generation and parameters --------------------------------------------------------------------------
def test_text_and_generations_append_in_program_order():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "A"
        s += "B" + sgl.gen("x") + "C"
        s += sgl.gen("y")
        s += "D"

    state = program.run(backend=backend)
    assert state.error() is None
    assert backend.prompts() == ["AB", "AB<AB>C"]  # each generation sees exactly the text before it
    assert state["x"] == "<AB>" and state["y"] == "<B<AB>C>"
    assert state.text() == "AB<AB>C<B<AB>C>D"
    assert state.get_meta_info("x") == {"prompt": "AB"}


def test_gen_arguments_override_the_run_defaults():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "q" + sgl.gen("a", max_tokens=3, stop="x") + sgl.gen("b")

    program.run(backend=backend, max_new_tokens=5, temperature=0.5, stop="\n")
    first, second = backend.params()
    assert first["max_new_tokens"] == 3 and first["stop"] == "x" and first["temperature"] == 0.5
    assert second["max_new_tokens"] == 5 and second["stop"] == ["\n"] and second["temperature"] == 0.5


def test_reading_a_variable_blocks_until_it_is_produced_while_the_program_runs_ahead():
    backend = GatedBackend()
    ran_ahead, seen = threading.Event(), []

    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("a")
        ran_ahead.set()  # reached while the generation is still held inside the backend
        seen.append(s["a"])
        s += "!"

    runner = run_in_thread(lambda: program.run(backend=backend))
    assert backend.entered.wait(WAIT_S) and ran_ahead.wait(WAIT_S)
    time.sleep(0.2)
    assert seen == []  # s["a"] is still waiting for the backend
    backend.release.set()
    runner.join(WAIT_S)
    assert seen == ["<Q:>"]


# -- fork / join ---------------------------------------------------------------------------------------------
def test_fork_caches_the_prefix_once_then_runs_children_in_parallel():
    backend = BarrierBackend(n=3, applies=lambda prompt: "Branch" in prompt)

    @sgl.function
    def program(s):
        s += "Topic:" + sgl.gen("topic")
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" Branch {i}:" + sgl.gen("out")
        forks.join()

    state = program.run(backend=backend)
    assert state.error() is None
    assert backend.most_inside == 3  # all three children were inside the backend at once
    prefix = "Topic:<Topic:>"
    kinds = [kind for kind, _, _ in backend.calls]
    assert kinds == ["generate", "cache_prefix", "generate", "generate", "generate"]
    assert backend.prompts("cache_prefix") == [prefix]  # after the parent's gen, before any child's
    assert sorted(backend.prompts()[1:]) == [f"{prefix} Branch {i}:" for i in range(3)]


def test_join_gather_variable_gives_the_parent_each_new_variable_as_a_list_in_child_order():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "Tips:"
        forks = s.fork(3)
        forks += lambda i: f"#{i}" + sgl.gen("tip")
        forks.join()
        s += " summary" + sgl.gen("summary")

    state = program.run(backend=backend)
    assert state["tip"] == ["<ips:#0>", "<ips:#1>", "<ips:#2>"]
    assert state.text() == "Tips: summary<ummary>"  # gather_variable leaves the parent's text alone


def test_join_concate_and_append_appends_each_childs_text_in_order():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "Facts:"
        forks = s.fork(3)
        forks += [f" [{i}]" + sgl.gen("fact") for i in range(3)]  # one expression per child
        forks.join(mode="concate_and_append")
        s += " So" + sgl.gen("answer")

    state = program.run(backend=backend)
    joined = "Facts: [0]<s: [0]> [1]<s: [1]> [2]<s: [2]>"
    assert state.text() == joined + " So<2]> So>"
    assert backend.prompts()[-1] == joined + " So"  # the next generation sees the appended text


def test_concate_and_append_takes_each_childs_text_from_the_fork_point():
    @sgl.function
    def program(s):
        s += "P"
        forks = s.fork(2)
        forks += lambda i: f"[child {i}]"
        s += "+parent"  # the parent grows between fork and join
        forks.join(mode="concate_and_append")

    assert program.run(backend=ScriptedBackend()).text() == "P+parent[child 0][child 1]"


def test_children_keep_their_own_text_and_variables():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "P" + sgl.gen("base")
        forks = s.fork(2)
        forks += lambda i: f"/{i}" + sgl.gen("leaf")
        return [f.text() for f in forks], [f["base"] for f in forks], [f["leaf"] for f in forks]

    texts, bases, leaves = program.run(backend=backend).ret_value
    assert texts == ["P<P>/0<P<P>/0>", "P<P>/1<P<P>/1>"]
    assert bases == ["<P>", "<P>"]  # the parent's variables are visible in each child
    assert leaves == ["<P<P>/0>", "<P<P>/1>"]


def test_join_rejects_an_unknown_mode():
    @sgl.function
    def program(s):
        s += "x"
        s.fork(2).join(mode="zip")

    with pytest.raises(ValueError, match="concate_and_append"):
        program.run(backend=ScriptedBackend())


def test_forked_children_do_not_leak_worker_threads():
    @sgl.function
    def program(s):
        s += "x"
        forks = s.fork(4)
        forks += sgl.gen("y")
        forks.join()

    before = threading.active_count()
    for _ in range(10):
        program.run(backend=ScriptedBackend())
    deadline = time.monotonic() + WAIT_S
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= before


# -- roles -----------------------------------------------------------------------------------------------------
TAGS = RoleTemplate({r: f"<{r[0]}>" for r in ("system", "user", "assistant")},
                    {r: f"</{r[0]}>" for r in ("system", "user", "assistant")})


def test_role_forms_use_the_backends_template_and_build_openai_messages():
    backend = ScriptedBackend(respond=lambda prompt: "R" + str(prompt.count("<a>")), template=TAGS)

    @sgl.function
    def chat(s):
        s += sgl.system("Be brief.")
        with s.user():
            s += "Hi"
        s += sgl.assistant(sgl.gen("reply1"))
        s.user("Again")
        s += sgl.assistant_begin() + sgl.gen("reply2") + sgl.assistant_end()
        s += sgl.user_begin() + "Bye" + sgl.user_end()

    state = chat.run(backend=backend)
    assert state.text() == "<s>Be brief.</s><u>Hi</u><a>R1</a><u>Again</u><a>R2</a><u>Bye</u>"
    assert backend.prompts() == ["<s>Be brief.</s><u>Hi</u><a>",
                                 "<s>Be brief.</s><u>Hi</u><a>R1</a><u>Again</u><a>"]
    assert state.messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "R1"}, {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "R2"}, {"role": "user", "content": "Bye"},
    ]


def test_backends_without_a_template_get_plain_role_markers():
    @sgl.function
    def chat(s):
        s += sgl.user("Hi") + sgl.assistant("Hello")

    assert chat.run(backend=ScriptedBackend()).text() == "User: Hi\nAssistant: Hello\n"


# -- variables ---------------------------------------------------------------------------------------------------
def test_var_scope_captures_the_text_appended_inside_it():
    backend = ScriptedBackend()

    @sgl.function
    def program(s):
        s += "Before "
        with s.var_scope("block"):
            s += "in " + sgl.gen("g")
        s += " after"

    state = program.run(backend=backend)
    assert state["block"] == "in <re in >"
    assert state.text() == "Before in <re in > after"


def test_set_var_and_ret_value():
    @sgl.function
    def program(s):
        s += "n=" + sgl.gen("n")
        return "done"

    state = program.run(backend=ScriptedBackend(respond=lambda prompt: "41"))
    state["n"] = int(state["n"]) + 1
    assert state["n"] == 42 and state.ret_value == "done"


# -- errors -------------------------------------------------------------------------------------------------------
def explode_on(word: str):
    def respond(prompt):
        if prompt.endswith(word):
            raise RuntimeError("the model fell over")
        return echo(prompt)
    return respond


def test_a_backend_error_is_kept_and_raised_where_the_program_is_read():
    backend = ScriptedBackend(respond=explode_on("boom:"))

    @sgl.function
    def program(s):
        s += "ok:" + sgl.gen("first")
        s += " boom:" + sgl.gen("second")
        s += " after:" + sgl.gen("third")

    with pytest.warns(RuntimeWarning, match="fell over"):  # SGLang warns too; the program never read "second"
        state = program.run(backend=backend)
    error = state.error()
    assert isinstance(error, RuntimeError) and "fell over" in str(error)
    assert state["first"] == "<ok:>"
    with pytest.raises(ProgramError, match="'second' was never produced") as info:
        state["second"]
    assert info.value.__cause__ is error
    with pytest.raises(ProgramError):
        state["third"]
    assert len(backend.prompts()) == 2  # nothing after the failure ran
    assert state.text() == "ok:<ok:> boom:"


def test_reading_a_variable_a_failed_primitive_never_produced_raises_from_run():
    @sgl.function
    def program(s):
        s += "boom:" + sgl.gen("x")
        s += s["x"]  # raises ProgramError inside the program: the caller sees it, with the backend's error as cause

    with pytest.warns(RuntimeWarning), pytest.raises(ProgramError, match="'x' was never produced") as info:
        program.run(backend=ScriptedBackend(respond=explode_on("boom:")))
    assert isinstance(info.value.__cause__, RuntimeError) and "fell over" in str(info.value.__cause__)


def test_the_programs_own_exception_surfaces_from_run():
    """As SGLang's run: never swallowed into state.error() with the text cut short."""
    @sgl.function
    def program(s):
        s += "q" + sgl.gen("a")
        if s["a"]:
            raise ValueError("the answer was not a number")

    with pytest.raises(ValueError, match="not a number"):
        program.run(backend=ScriptedBackend())


def test_a_streamed_programs_exception_is_kept_and_raised_at_the_end_of_its_text():
    @sgl.function
    def program(s):
        s += "q" + sgl.gen("a")
        raise ValueError("late failure")

    state = program.run(backend=ScriptedBackend(), stream=True)
    pieces = []
    with pytest.raises(ValueError, match="late failure"):
        for piece in state.text_iter():
            pieces.append(piece)
    assert "".join(pieces) == "q<q>" and isinstance(state.error(), ValueError)


def test_reading_a_variable_that_was_never_produced_raises_instead_of_hanging():
    state = sgl.function(lambda s: s.__iadd__("x")).run(backend=ScriptedBackend())
    with pytest.raises(ProgramError, match="'missing' was never produced"):
        state["missing"]


def test_reading_inside_the_program_a_variable_nothing_produces_fails_instead_of_deadlocking():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("answer")
        s += s["anwser"]  # a typo: waiting for it would never end

    with pytest.raises(ProgramError, match="'anwser'"):
        program.run(backend=ScriptedBackend())


def test_another_thread_may_wait_for_a_variable_the_program_has_not_reached_yet():
    backend = GatedBackend()

    @sgl.function
    def program(s):
        assert backend.release.wait(WAIT_S)
        s += "Q:" + sgl.gen("answer")

    state = program.run(backend=backend, stream=True)  # the program runs on its own thread
    seen = []
    reader = run_in_thread(lambda: seen.append(state["answer"]))
    time.sleep(0.1)
    backend.release.set()
    reader.join(WAIT_S)
    assert seen == ["<Q:>"]


def test_run_batch_keeps_a_failed_primitive_in_its_state_and_raises_a_programs_exception():
    """SGLang's run_batch: a backend failure stays in that program's state (the others are unaffected); an
    exception the program function raises propagates."""
    @sgl.function
    def program(s, word):
        s += word + sgl.gen("a")
        if word == "raise:":
            raise KeyError("own failure")

    backend = ScriptedBackend(respond=explode_on("boom:"))
    with pytest.warns(RuntimeWarning, match="fell over"):
        states = program.run_batch([{"word": w} for w in ("one:", "boom:", "two:")], backend=backend, num_threads=4)
    assert [type(s.error()).__name__ for s in states] == ["NoneType", "RuntimeError", "NoneType"]
    assert states[0]["a"] == "<one:>" and states[2]["a"] == "<two:>"
    with pytest.raises(KeyError, match="own failure"):
        program.run_batch([{"word": w} for w in ("one:", "raise:")], backend=backend, num_threads=2)


def test_run_batch_generator_style_yields_the_states_in_order():
    backend = GatedBackend()

    @sgl.function
    def program(s, word):
        s += word + sgl.gen("a")

    backend.release.set()
    states = program.run_batch([{"word": f"w{i}:"} for i in range(5)], backend=backend, generator_style=True)
    assert not isinstance(states, list)
    assert [s["a"] for s in states] == [f"<w{i}:>" for i in range(5)]
    assert list(program.run_batch([], backend=backend, generator_style=True)) == []


def test_run_takes_sglangs_sampling_keywords_instead_of_passing_them_to_the_program():
    backend = ScriptedBackend()

    @sgl.function
    def program(s, **program_arguments):
        assert program_arguments == {"topic": "t"}
        s += "x" + sgl.gen("a")

    program.run(topic="t", n=1, stop_regex=r"\d", return_text_in_logprobs=True, use_thread=False, backend=backend)
    assert backend.params()[0]["stop_regex"] == r"\d" and backend.params()[0]["n"] == 1


def test_use_thread_false_runs_each_primitive_on_the_programs_thread():
    seen = []

    class Recording(ScriptedBackend):
        def generate(self, text, params, logprob):
            seen.append(threading.current_thread())
            return super().generate(text, params, logprob)

    @sgl.function
    def program(s):
        s += "a" + sgl.gen("x")
        s += "b" + sgl.gen("y")

    state = program.run(backend=Recording(), use_thread=False)
    assert seen == [threading.current_thread()] * 2 and state.text() == "a<a>b<a<a>b>"


def test_appending_a_non_text_value_is_refused_with_a_message():
    @sgl.function
    def program(s):
        s += None

    with pytest.raises(ValueError, match="None"):
        program.run(backend=ScriptedBackend())

    @sgl.function
    def number(s):
        s += 5

    with pytest.raises(TypeError, match="cannot append int"):
        number.run(backend=ScriptedBackend())


# -- streaming ----------------------------------------------------------------------------------------------------
def test_text_iter_streams_in_order_while_the_model_is_still_generating():
    gate = threading.Event()
    backend = ChunkedBackend(["Hel", "lo", "!"], gate=gate)

    @sgl.function
    def program(s):
        s += "Q: " + sgl.gen("answer") + "\n"
        s += "Tail: " + sgl.gen("tail")

    state = program.run(backend=backend, stream=True)
    pieces = state.text_iter()
    assert [next(pieces), next(pieces)] == ["Q: ", "Hel"]  # arrives before the backend may go on
    gate.set()
    assert [*pieces] == ["lo", "!", "\n", "Tail: ", "Hel", "lo", "!"]
    assert state.text() == "Q: Hello!\nTail: Hello!"
    assert state["answer"] == "Hello!" and state.get_meta_info("answer") == {"chunks": 3}


def test_text_iter_of_one_variable_yields_only_its_pieces():
    @sgl.function
    def program(s):
        s += "Q: " + sgl.gen("answer") + "\n" + sgl.gen("other")

    state = program.run(backend=ChunkedBackend(["a", "b", "c"]), stream=True)
    assert list(state.text_iter("answer")) == ["a", "b", "c"]


def test_text_iter_without_streaming_yields_the_whole_text_once():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("a")

    state = program.run(backend=ScriptedBackend())
    assert list(state.text_iter()) == ["Q:<Q:>"] and list(state.text_iter("a")) == ["<Q:>"]

    async def collect(var_name=None):
        return [piece async for piece in state.text_async_iter(var_name)]
    assert asyncio.run(collect()) == ["Q:<Q:>"] and asyncio.run(collect("a")) == ["<Q:>"]


def test_text_async_iter_streams():
    @sgl.function
    def program(s):
        s += "Q: " + sgl.gen("answer")

    state = program.run(backend=ChunkedBackend(["a", "b"]), stream=True)

    async def collect():
        return [piece async for piece in state.text_async_iter()]
    assert asyncio.run(collect()) == ["Q: ", "a", "b"]


# -- composition ----------------------------------------------------------------------------------------------------
@sgl.function
def greet(s, name, punct):
    s += "Hello " + name + punct


def test_run_batch_takes_positional_argument_tuples_like_sglang():
    states = greet.run_batch([("Ann", "!"), ("Bo", "?")], backend=ScriptedBackend())
    assert [s.text() for s in states] == ["Hello Ann!", "Hello Bo?"]


def test_bind_fixes_arguments_without_changing_the_original():
    bound = greet.bind(punct="!")
    assert bound.run(name="Ann", backend=ScriptedBackend()).text() == "Hello Ann!"
    assert greet.bind_arguments == {}


@sgl.function
def ask(s, question):
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=4)


def test_a_function_called_inside_another_appends_to_the_callers_state():
    backend = ScriptedBackend(respond=lambda prompt: str(prompt.count("Q:")))

    @sgl.function
    def two_questions(s):
        ask(s, "first?")
        s += "\n"
        ask(s, "second after " + s["answer"] + "?")

    state = two_questions.run(backend=backend)
    assert state.text() == "Q: first?\nA:1\nQ: second after 1?\nA:2"
    assert backend.params()[0]["max_new_tokens"] == 4


def test_calling_a_function_directly_runs_it_like_sglang():
    state = ask(question="why?", backend=ScriptedBackend(), temperature=0)
    assert state["answer"] == "<hy?\nA:>"


# -- select and unsupported primitives ------------------------------------------------------------------------------
def test_gen_with_choices_becomes_a_select():
    backend = ScriptedBackend(choose=lambda prompt, choices: choices[-1])

    @sgl.function
    def program(s):
        s += "Pick: " + sgl.gen("pick", choices=["red", "blue"], choices_method=sgl.greedy_token_selection)
        s += " then " + sgl.select("again", ["up", "down"])

    state = program.run(backend=backend)
    assert state.text() == "Pick: blue then down" and state["pick"] == "blue"
    assert backend.prompts() == []  # no generation: both were scored as choices
    (_, first, args), (_, second, _) = backend.calls
    assert first == "Pick: " and second == "Pick: blue then "
    assert args == {"choices": ["red", "blue"], "temperature": 0.0, "method": sgl.greedy_token_selection}


def test_constrained_gen_carries_its_constraint_to_the_runtime():
    import json

    import pydantic

    class City(pydantic.BaseModel):
        name: str
        population: int

    assert sgl.gen("x", regex=r"\d+").params["regex"] == r"\d+"
    assert json.loads(sgl.gen("x", json_schema={"type": "object"}).params["json_schema"]) == {"type": "object"}
    assert json.loads(sgl.gen("x", json_schema=City).params["json_schema"])["required"] == ["name", "population"]
    assert sgl.gen("x", json_schema='{"type": "string"}').params["json_schema"] == '{"type": "string"}'
    assert sgl.gen_int("x").params["regex"] == sgl.gen("x", dtype=int).params["regex"] == r"[-+]?[0-9]+"
    assert sgl.gen("x", dtype="bool").params["regex"] == "(True|False)"
    assert sgl.gen_string("x", max_tokens=8).params == {**sgl.gen("x", 8, dtype=str).params}
    with pytest.raises(ValueError, match="dtype"):
        sgl.gen("x", dtype=list)
    assert sgl.gen("x", dtype=int, regex="a").params["regex"] == r"[-+]?[0-9]+"  # SGLang: dtype wins over regex
    with pytest.raises(ValueError, match="at most one"):
        sgl.gen("x", dtype=int, json_schema={"type": "integer"})


def test_constrained_gen_sends_the_constraint_in_the_sampling_params():
    backend = ScriptedBackend(lambda prompt: "42")

    @sgl.function
    def prog(s):
        s += "n = " + sgl.gen_int("n")

    state = prog.run(backend=backend)
    assert state["n"] == "42"
    assert backend.params()[0]["regex"] == r"[-+]?[0-9]+"


def test_select_needs_choices():
    with pytest.raises(ValueError, match="choices"):
        sgl.select("x", [])


# -- choice methods on hand-made logprobs, called with SGLang's protocol ---------------------------------------
def scores(choices, logprobs, unconditional=None) -> dict:
    """The keyword arguments a choice method gets; entries are (logprob, token id, token text)."""
    entries = [[(lp, 100 + j, None) for j, lp in enumerate(row)] for row in logprobs]
    return dict(choices=choices, normalized_prompt_logprobs=[sum(r) / len(r) for r in logprobs],
                input_token_logprobs=entries, output_token_logprobs=[[] for _ in choices],
                unconditional_token_logprobs=None if unconditional is None else
                [[(lp, 100 + j, None) for j, lp in enumerate(row)] for row in unconditional])


def test_token_length_normalized_picks_the_highest_mean_logprob():
    result = sgl.token_length_normalized(**scores(["A", "BB"], [[-1.0], [-0.2, -2.5]]))  # means -1.0 and -1.35
    assert isinstance(result, sgl.ChoicesDecision) and result.decision == "A"
    assert result.meta_info["normalized_prompt_logprobs"] == pytest.approx([-1.0, -1.35])
    assert set(result.meta_info) == {"normalized_prompt_logprobs", "input_token_logprobs", "output_token_logprobs"}


def test_greedy_token_selection_compares_token_by_token():
    # Same choices as above: the first token of "BB" is the most likely, so greedy picks it.
    assert sgl.greedy_token_selection(**scores(["A", "BB"], [[-1.0], [-0.2, -2.5]])).decision == "BB"
    # A tie on the first token is broken by the second.
    tie = scores(["x", "y", "z"], [[-0.5, -1.0], [-0.5, -0.2], [-0.9]])
    assert sgl.greedy_token_selection(**tie).decision == "y"
    # A shorter choice competes past its end with its mean logprob.
    assert sgl.greedy_token_selection(**scores(["New", "New York"], [[-0.3], [-0.3, -0.1]])).decision == "New York"
    result = sgl.greedy_token_selection(**scores(["New", "New York"], [[-0.3], [-0.3, -0.9]]))
    assert result.decision == "New" and result.meta_info["greedy_logprob_matrix"] == [[-0.3, -0.3], [-0.3, -0.9]]


def test_unconditional_likelihood_discounts_a_choice_that_is_likely_anyway():
    # "the" is likelier in context (-1.0 vs -2.0) but also without any context (-0.5): it tells us nothing.
    given = scores(["Paris", "the"], [[-2.0], [-1.0]], unconditional=[[-6.0], [-0.5]])
    assert sgl.token_length_normalized(**given).decision == "the"
    result = sgl.unconditional_likelihood_normalized(**given)
    assert result.decision == "Paris"
    assert result.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([4.0, -0.5])
    assert sgl.unconditional_likelihood_normalized.requires_unconditional_logprobs
    assert not sgl.token_length_normalized.requires_unconditional_logprobs
    with pytest.raises(ValueError, match="unconditional"):
        sgl.unconditional_likelihood_normalized(**scores(["a"], [[-1.0]]))
