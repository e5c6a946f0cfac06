"""SGLang frontend idioms that real programs use, each behaving as in SGLang (scripted backends, no model)."""

from __future__ import annotations

import asyncio
import threading

import pytest

import radixflow as sgl
from radixflow.backends.base import RuntimeBackend
from radixflow.lang.chat_template import RoleTemplate
from tests.lang.scripted_backend import WAIT_S, ChunkedBackend, ScriptedBackend

TAGS = RoleTemplate({"system": "<s>", "user": "<u>", "assistant": "<a>"},
                    {"system": "</s>", "user": "</u>", "assistant": "</a>"})


class Samples(RuntimeBackend):
    """A runtime backend whose n samples are "s0", "s1", ...; it records the parameters it was sent."""

    def __init__(self):
        self.params = []

    def _generate(self, prompts, params, logprob):
        self.params.append(params[0])
        n = params[0].get("n", 1)
        return [{"text": f"s{i}", "meta_info": {"sample": i}} for i in range(n)]


# -- forks ------------------------------------------------------------------------------------------------------
def test_forks_i_plus_equals_appends_to_that_child():
    @sgl.function
    def program(s):
        s += "P"
        forks = s.fork(3)
        for i in range(3):
            forks[i] += f"/{i}"
            forks[i] += sgl.gen("tip")
        forks.join()
        return [f.text() for f in forks]

    state = program.run(backend=ScriptedBackend())
    assert state.ret_value == ["P/0<P/0>", "P/1<P/1>", "P/2<P/2>"]
    assert state["tip"] == ["<P/0>", "<P/1>", "<P/2>"]


def test_a_forks_child_cannot_be_replaced():
    @sgl.function
    def program(s):
        forks = s.fork(2)
        forks[0] = forks[1]

    with pytest.raises(TypeError, match="cannot be replaced"):
        program.run(backend=ScriptedBackend())


def test_fork_takes_position_ids_offset_and_copy_is_a_context_manager():
    @sgl.function
    def program(s):
        s += "Q"
        forks = s.fork(2, position_ids_offset=[0, 0])
        forks += sgl.gen("a")
        forks.join()
        with s.copy() as c:
            c += "!" + sgl.gen("b")
        s += "end"

    state = program.run(backend=ScriptedBackend())
    assert state["a"] == ["<Q>", "<Q>"]
    assert state["b"] == ["<Q!>"]  # the child's new variable comes back, as SGLang's join gathers it
    assert state.text() == "Qend"


# -- streaming --------------------------------------------------------------------------------------------------
def test_text_iter_of_a_variable_ends_when_it_is_complete_and_can_be_called_again():
    gate = threading.Event()

    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("answer")
        assert gate.wait(WAIT_S)  # the program goes on only after the reader has the whole answer
        s += " More:" + sgl.gen("more")

    state = program.run(backend=ChunkedBackend(["a", "b", "c"]), stream=True)
    assert list(state.text_iter("answer")) == ["a", "b", "c"]  # returns although the program is still running
    assert list(state.text_iter("answer")) == ["a", "b", "c"]  # a second call replays it, it does not hang
    gate.set()
    assert list(state.text_iter("more")) == ["a", "b", "c"]
    assert "".join(state.text_iter()) == "Q:abc More:abc"


def test_text_async_iter_with_meta_data():
    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("answer")

    state = program.run(backend=ChunkedBackend(["x", "y"]), stream=True)

    async def collect():
        return [item async for item in state.text_async_iter("answer", return_meta_data=True)]

    items = asyncio.run(collect())
    assert [text for text, _ in items] == ["x", "y"]
    assert items[-1][1] == {"chunks": 2}  # the backend's meta info, once it has sent it


# -- gen and roles ----------------------------------------------------------------------------------------------
def test_gen_with_n_returns_the_list_of_samples_and_continues_with_the_first():
    backend = Samples()

    @sgl.function
    def program(s):
        s += "Q:" + sgl.gen("x", n=3) + "|"

    state = program.run(backend=backend)
    assert state["x"] == ["s0", "s1", "s2"] and state.text() == "Q:s0|"
    assert state.get_meta_info("x") == [{"sample": 0}, {"sample": 1}, {"sample": 2}]
    assert backend.params[0]["n"] == 3


def test_gen_int_and_gen_string_take_sglangs_parameters():
    node = sgl.gen_int("n", 8, None, ["\n"], None, r"\s", 0.5, 0.9, 5, 0.1, 0.2, 0.3, True, min_tokens=2)
    assert node.params["stop"] == ["\n"] and node.params["stop_regex"] == r"\s" and node.params["top_k"] == 5
    assert node.params["min_new_tokens"] == 2 and node.params["regex"] == r"[-+]?[0-9]+"
    assert sgl.gen_string("t", max_tokens=4, stop_regex="x").params["stop_regex"] == "x"


def test_regex_constants_are_importable_from_the_ir():
    import re

    from radixflow.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

    assert re.fullmatch(REGEX_INT, "365\n") and re.fullmatch(REGEX_FLOAT, "3.14 ")
    assert re.fullmatch(REGEX_BOOL, "True") and re.fullmatch(REGEX_STR, '"Paris France"')


def test_a_role_with_no_content_is_an_empty_block():
    backend = ScriptedBackend(template=TAGS)

    @sgl.function
    def program(s):
        s += sgl.user()
        s += sgl.assistant("hi")

    state = program.run(backend=backend)
    assert state.text() == "<u></u><a>hi</a>"
    assert state.messages() == [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]


def test_separate_reasoning_moves_the_thinking_into_its_own_variable():
    backend = ScriptedBackend(respond=lambda prompt: "<think>two plus two</think> It is 4.")

    @sgl.function
    def program(s):
        s += sgl.assistant(sgl.separate_reasoning(sgl.gen("answer"), model_type="deepseek-r1"))

    state = program.run(backend=backend)
    assert state["answer"] == "It is 4." and state["answer_reasoning_content"] == "two plus two"
    assert state.text() == "Assistant: It is 4.\n"
    with pytest.raises(ValueError, match="model_type"):
        sgl.separate_reasoning(sgl.gen("x"), model_type="no-such-model")


@pytest.mark.parametrize("media", [sgl.image("cat.png"), sgl.video("cat.mp4", 8)])
def test_media_on_a_text_only_backend_fails_at_the_call_naming_the_backend(media):
    reached = []

    @sgl.function
    def program(s):
        s += sgl.user(media + "What is this?")
        reached.append(True)

    with pytest.raises(sgl.ProgramError, match="ScriptedBackend.*takes text only"):
        program.run(backend=ScriptedBackend())
    assert not reached


# -- run, bind, global_config -----------------------------------------------------------------------------------
def test_a_bound_argument_wins_over_the_same_argument_given_to_run():
    backend = ScriptedBackend()

    @sgl.function
    def program(s, topic):
        s += topic

    assert program.bind(topic="bound").run(topic="given", backend=backend).text() == "bound"


def test_trace_and_compile_take_a_backend_keyword():
    @sgl.function
    def program(s, q):
        s += "Q: " + q + sgl.gen("a")

    assert program.trace(backend=ScriptedBackend()).parameters == ["q"]
    assert program.compile(backend=ScriptedBackend()).run(q="x", backend=ScriptedBackend())["a"] == "<Q: x>"


def test_global_config_default_backend_verbosity_and_precache(capsys, monkeypatch):
    backend = ScriptedBackend()
    monkeypatch.setattr(sgl.global_config, "default_backend", backend)

    @sgl.function
    def program(s, q):
        s += "A long shared instruction that every program of the batch starts with, " * 2 + q + sgl.gen("a")

    monkeypatch.setattr(sgl.global_config, "verbosity", 2)
    program.run(q="x")
    assert "starts with" in capsys.readouterr().out  # verbosity 2 prints each program's text
    monkeypatch.setattr(sgl.global_config, "verbosity", 0)
    program.run_batch([{"q": "a"}, {"q": "b"}])
    assert len(backend.prompts("cache_prefix")) == 1
    monkeypatch.setattr(sgl.global_config, "enable_precache_with_tracing", False)
    program.run_batch([{"q": "a"}, {"q": "b"}])
    assert len(backend.prompts("cache_prefix")) == 1  # no second prefetch
    monkeypatch.setattr(sgl.global_config, "skip_special_tokens_in_output", False)
    program.run(q="x")
    assert backend.params()[-1]["skip_special_tokens"] is False


# -- backends and chat templates --------------------------------------------------------------------------------
def test_runtime_takes_sglangs_server_argument_names_and_refuses_unknown_ones_before_launching():
    from radixflow.backends.runtime import server_flags

    assert server_flags({"context_length": 512, "chunked_prefill_size": -1, "random_seed": 3, "tp_size": 2,
                         "dp_size": 2, "disable_radix_cache": True, "schedule_policy": "fcfs"}) == [
        "--context-length", "512", "--no-enable-chunked-prefill", "--seed", "3", "--tp-size", "2", "--dp-size", "2",
        "--disable-radix-cache", "--schedule-policy", "fcfs"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        sgl.Runtime(trust_remote_code=True)
    with pytest.raises(TypeError, match="'mem_fraction_static'"):
        sgl.Runtime(mem_fraction_static=0.8)


def test_a_named_chat_template_with_its_default_system_prompt_and_stop_strings():
    from radixflow.lang.chat_template import ChatTemplate, get_chat_template, register_chat_template

    backend = ScriptedBackend()
    backend.chat_template = get_chat_template("qwen")

    @sgl.function
    def program(s):
        s += sgl.user("hi")
        s += sgl.assistant(sgl.gen("a", stop="\n"))

    state = program.run(backend=backend)
    assert state.text().startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert backend.params()[0]["stop"] == ["\n", "<|im_end|>"]
    register_chat_template(ChatTemplate("brackets", None, {"user": ("[", "]"), "assistant": ("(", ")")}))
    backend.chat_template = get_chat_template("brackets")
    assert program.run(backend=backend).text() == "[hi](<[hi](>)"
    with pytest.raises(ValueError, match="not registered"):
        get_chat_template("no-such-template")
