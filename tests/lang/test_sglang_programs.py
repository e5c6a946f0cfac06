"""SGLang's own kind of frontend test programs (those of its `python/sglang/test/test_programs.py`), written against
SGLang's API with only the import changed, on the embedded SmolLM2 through the in-process engine and through a
`Runtime` over HTTP. A 135M model answers badly, so these assert API behaviour, not answer quality."""

from __future__ import annotations

import json
import re

import pytest

import radixflow as sgl

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def default_backend(real_backend):
    """The programs run on the default backend, as SGLang's test programs do (`sgl.set_default_backend`)."""
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(real_backend)
    yield real_backend
    sgl.global_config.default_backend = previous


def test_few_shot_qa_run_and_run_batch():
    @sgl.function
    def few_shot_qa(s, question):
        s += "The following are questions with answers.\n\n"
        s += "Q: What is the capital of France?\nA: Paris\n"
        s += "Q: What is the capital of Germany?\nA: Berlin\n"
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", stop="\n", temperature=0)

    ret = few_shot_qa.run(question="What is the capital of Spain?")
    assert ret["answer"].strip() == "Madrid"
    rets = few_shot_qa.run_batch([{"question": "What is the capital of Japan?"},
                                  {"question": "What is the capital of Italy?"}], temperature=0.1)
    assert len(rets) == 2 and all(isinstance(r["answer"], str) for r in rets)


def test_mt_bench_roles():
    @sgl.function
    def answer_mt_bench(s, question_1, question_2):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question_1)
        s += sgl.assistant(sgl.gen("answer_1"))
        with s.user():
            s += question_2
        with s.assistant():
            s += sgl.gen("answer_2")

    ret = answer_mt_bench.run(question_1="Describe Hawaii in one sentence.", question_2="Now shorter.",
                              temperature=0.7, max_new_tokens=24)
    assert len(ret.messages()) in [4, 5]


def test_select_and_decode_int():
    @sgl.function
    def true_or_false(s, statement):
        s += "Determine whether the statement below is True, False, or Unknown.\n"
        s += "Statement: " + statement + "\n"
        s += "Answer:" + sgl.select("answer", ["True", "False", "Unknown"])

    ret = true_or_false.run(statement="The capital of Germany is Berlin.")
    assert ret["answer"] in ["True", "False", "Unknown"]
    meta = ret.get_meta_info("answer")
    assert {"normalized_prompt_logprobs", "input_token_logprobs", "output_token_logprobs"} <= set(meta)

    @sgl.function
    def decode_int(s):
        s += "The number of hours in a day is " + sgl.gen_int("hours") + "\n"
        s += "The number of days in a year is " + sgl.gen_int("days") + "\n"

    ret = decode_int.run(temperature=0.1)
    assert int(ret["hours"]) >= 0 and int(ret["days"]) >= 0


def test_decode_json_with_the_regex_constants():
    @sgl.function
    def decode_json(s):
        from radixflow.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR

        s += "Generate a JSON object to describe the basic city information of Paris.\n"
        with s.var_scope("json_output"):
            s += "{\n"
            s += '  "name": ' + sgl.gen(regex=REGEX_STR) + ",\n"
            s += '  "population": ' + sgl.gen(regex=REGEX_INT, stop=[" ", "\n"]) + ",\n"
            s += '  "latitude": ' + sgl.gen(regex=REGEX_FLOAT, stop=[" ", "\n"]) + "\n"
            s += "}"

    ret = decode_json.run(temperature=0.0, max_new_tokens=16)
    js_obj = json.loads(ret["json_output"])
    assert isinstance(js_obj["name"], str) and isinstance(js_obj["population"], int)


def test_decode_json_with_typed_gens():
    @sgl.function
    def decode_json(s):
        s += "Generate a JSON object to describe the basic city information of Paris.\n"
        with s.var_scope("json_output"):
            s += "{\n"
            s += '  "name": ' + sgl.gen_string() + ",\n"
            s += '  "population": ' + sgl.gen_int() + ",\n"
            s += '  "area": ' + sgl.gen(dtype=int) + ",\n"
            s += '  "timezone": ' + sgl.gen(dtype=str) + "\n"
            s += "}"

    ret = decode_json.run(max_new_tokens=16, temperature=0)
    # Each gen kept to its type; a string may be cut by max_new_tokens before its closing quote (the model's
    # choice), and when none is, the object is JSON (SGLang's test parses it outright).
    string = r'("[^"\\\x00-\x1f]*"?)'
    fields = re.fullmatch(r'\{\n  "name": ' + string + r',\n  "population": ([-+]?[0-9]+),\n  "area": ([-+]?[0-9]+),'
                          r'\n  "timezone": ' + string + r'\n\}', ret["json_output"])
    assert fields, ret["json_output"]
    if all(len(value) > 1 and value.endswith('"') for value in (fields[1], fields[4])):
        js_obj = json.loads(ret["json_output"])
        assert isinstance(js_obj["name"], str) and isinstance(js_obj["population"], int)


def test_expert_answer_reads_a_variable_back():
    @sgl.function
    def expert_answer(s, question):
        s += "Question: " + question + "\n"
        s += "A good person to answer this question is" + sgl.gen("expert", stop=[".", "\n"], max_tokens=16) + ".\n"
        s += "For example," + s["expert"] + " would answer that " + sgl.gen("answer", stop=".", max_tokens=24) + "."

    ret = expert_answer.run(question="What is the capital of France?", temperature=0.1)
    assert ret["expert"] in ret.text() and ret.text().endswith(ret["answer"] + ".")


def test_tool_use_called_like_a_function():
    def calculate(expression):
        return f"{eval(expression)}"

    @sgl.function
    def tool_use(s, lhs, rhs):
        s += "Please perform computations using a calculator. You can use calculate(expression) to get results.\n"
        s += "For example,\ncalculate(1+2)=3\ncalculate(3*4)=12\n"
        s += "Question: What is the product of " + str(lhs) + " and " + str(rhs) + "?\n"
        s += "Answer: The answer is calculate(" + sgl.gen("expression", stop=")", max_tokens=16) + ") = "
        with s.var_scope("answer"):
            s += calculate(s["expression"])

    ret = tool_use(lhs=257, rhs=983, temperature=0)  # calling the function is `run`, as in SGLang
    assert ret["answer"] == calculate(ret["expression"])


def test_react_loop_with_select():
    @sgl.function
    def react(s, question):
        s += "Question: Which country does the founder of Microsoft live in?\nThought 1: I need to search.\n"
        s += "Action 1: Search [Founder of Microsoft].\nObservation 1: Bill Gates.\nAction 2: Finish [USA].\n\n"
        s += "Question: " + question + "\n"
        for i in range(1, 3):
            s += f"Thought {i}:" + sgl.gen(stop=[".", "\n"], max_tokens=16) + ".\n"
            s += f"Action {i}: " + sgl.select(f"action_{i}", ["Search", "Finish"])
            if s[f"action_{i}"] == "Search":
                s += " [" + sgl.gen(stop="]", max_tokens=8) + "].\n"
                s += f"Observation {i}:" + sgl.gen(stop=[".", "\n"], max_tokens=16) + ".\n"
            else:
                s += " [" + sgl.gen("answer", stop="]", max_tokens=8) + "].\n"
                break

    ret = react.run(question="What country does the creator of Linux live in?", temperature=0.1)
    assert ret["action_1"] in ("Search", "Finish")


def test_parallel_decoding_with_forks_i_plus_equals():
    fork_size = 3

    @sgl.function
    def parallel_decoding(s, topic):
        s += "Act as a helpful assistant.\nUSER: Give some tips for " + topic + ".\n"
        s += "ASSISTANT: Okay. Here are " + str(fork_size) + " concise tips, each under 8 words:\n"
        for i in range(1, 1 + fork_size):
            s += f"{i}." + sgl.gen(max_tokens=12, stop=[".", "\n"]) + ".\n"
        forks = s.fork(fork_size)
        for i in range(fork_size):
            forks[i] += f"Now, I expand tip {i + 1} into a detailed paragraph:\nTip {i + 1}:"
            forks[i] += sgl.gen("detailed_tip", 24, stop=["\n\n"])
        forks.join()
        s += "Here are these tips with detailed explanation:\n"
        for i in range(fork_size):
            s += f"Tip {i + 1}:" + forks[i]["detailed_tip"] + "\n"
        s += "\nIn summary," + sgl.gen("summary", max_tokens=24)

    ret = parallel_decoding.run(topic="writing a good blog post", temperature=0.3)
    assert isinstance(ret["summary"], str) and len(ret["detailed_tip"]) == fork_size


def test_parallel_encoding_with_concate_and_append():
    @sgl.function
    def parallel_encoding(s, question, context_0, context_1):
        s += "USER: Please memorize these statements.\n"
        contexts = [context_0, context_1]
        forks = s.fork(len(contexts))
        forks += lambda i: f"Statement {i}: " + contexts[i] + "\n"
        forks.join(mode="concate_and_append")
        s += "Now, please answer the following question.\nQuestion: " + question + "\n"
        s += "ASSISTANT:" + sgl.gen("answer", max_tokens=16)

    ret = parallel_encoding.run(question="Who is the father of Julian?", context_0="Ethan is the father of Liam.",
                                context_1="Noah is the father of Julian.", temperature=0)
    assert "Statement 0: Ethan" in ret.text() and "Statement 1: Noah" in ret.text()


def test_streaming_several_variables():
    @sgl.function
    def qa(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=16))
        s += sgl.user("And one more word?")
        s += sgl.assistant(sgl.gen("more", max_tokens=8))

    ret = qa(question="Name a color.", stream=True, temperature=0)
    first = "".join(ret.text_iter("answer"))
    assert first == "".join(ret.text_iter("answer"))  # a second pass replays it
    more = "".join(ret.text_iter("more"))
    assert first == ret["answer"] and more == ret["more"] and ret.text().endswith(more + "<|im_end|>\n")


def test_regex_and_dtype_gen():
    regex = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"

    @sgl.function
    def regex_gen(s):
        s += "Q: What is the IP address of the Google DNS servers?\n"
        s += "A: " + sgl.gen("answer", temperature=0, regex=regex)

    assert re.match(regex, regex_gen.run()["answer"])

    @sgl.function
    def dtype_gen(s):
        s += "Q: Which year was DNS invented?\nA: " + sgl.gen("int_res", dtype=int) + "\n"
        s += "Q: What is the value of pi?\nA: " + sgl.gen("float_res", dtype=float) + "\n"
        s += "Q: Is the sky blue?\nA: " + sgl.gen("bool_res", dtype=bool) + "\n"

    state = dtype_gen.run(temperature=0)
    state["int_res"] = int(state["int_res"])
    state["float_res"] = float(state["float_res"])
    assert state["bool_res"] in ("True", "False") and isinstance(state["int_res"], int)


def test_min_tokens_through_global_config(default_backend):
    @sgl.function
    def convo(s):
        s += sgl.user("What is the capital of the United States?")
        s += sgl.assistant(sgl.gen("answer", min_tokens=24, max_tokens=32))

    state = convo.run(temperature=0)  # no backend=: sgl.global_config.default_backend
    assert sgl.global_config.default_backend is default_backend
    tokenizer = (default_backend.tokenizer if isinstance(default_backend, sgl.Engine)
                 else default_backend.get_tokenizer())
    assert len(tokenizer.encode(state["answer"], add_special_tokens=False)) >= 24


def test_batch_in_generator_style():
    @sgl.function
    def capital(s, country):
        s += "Q: What is the capital of " + country + "?\nA:" + sgl.gen("answer", stop="\n", max_tokens=8)

    states = capital.run_batch([{"country": c} for c in ("France", "Japan", "Peru")], temperature=0,
                               generator_style=True)
    assert not isinstance(states, list)
    answers = [state["answer"] for state in states]
    assert len(answers) == 3 and answers[0] == capital.run(country="France", temperature=0)["answer"]


def test_gen_with_n_samples():
    @sgl.function
    def names(s):
        s += "Q: Name a fruit.\nA:" + sgl.gen("fruit", n=3, max_tokens=6, stop="\n", temperature=1.0)

    state = names.run()
    assert isinstance(state["fruit"], list) and len(state["fruit"]) == 3
    assert state.text() == "Q: Name a fruit.\nA:" + state["fruit"][0]


def test_runtime_methods(smol_runtime):
    """SGLang's Runtime also generates, tokenizes and caches prefixes by itself."""
    out = json.loads(smol_runtime.generate("The capital of France is", {"max_new_tokens": 4, "temperature": 0}))
    assert out["meta_info"]["completion_tokens"] == 4
    assert smol_runtime.encode("hello world") == smol_runtime.get_tokenizer().encode("hello world")
    smol_runtime.cache_prefix("A prefix worth caching for the requests that follow it, all of them.")
    endpoint = sgl.RuntimeEndpoint(smol_runtime.url, verify=False, chat_template_name="chatml")
    assert endpoint.get_model_name().endswith(".gguf") and endpoint.chat_template.name == "chatml"
    endpoint.shutdown()
