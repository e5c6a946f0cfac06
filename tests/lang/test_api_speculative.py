"""API speculative execution and chat-model prompts in the interpreter, on scripted API-model backends.

`DocumentModel` is a deterministic completion model over text: it continues a prompt with what follows it in a
document (word tokens, EOS at the end), so normal and speculative execution must give the same values, and every
call is counted.
"""

from __future__ import annotations

import re
import threading

import pytest

import radixflow as sgl
from radixflow.backends.base import BaseBackend
from radixflow.lang.chat_template import get_chat_template
from radixflow.lang.choices import ChoicesDecision

DOCUMENT = ("Construct a character.\nName: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n\n"
            "Now a new one.\nName: Ada Lovelace\nBirthday: December 10, 1815\nJob: mathematician and writer\n"
            "Motto: Imagination is the discovering faculty\n")
OFF_DOCUMENT = " lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"


def word_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


class DocumentModel(BaseBackend):
    """A completion API model: a prompt inside DOCUMENT continues with the document's text after it; any other
    prompt continues with OFF_DOCUMENT (its own deterministic text). Honours max_new_tokens (word tokens), stop
    strings (cut before them), EOS at the end of the document."""

    is_chat_model = False
    api_speculative_execution = True

    def __init__(self, document: str = DOCUMENT):
        self.document = document
        self.chat_template = get_chat_template("default")
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def generate(self, prompt, params, logprob):
        with self._lock:
            self.calls.append({"prompt": prompt, **params})
        rest, ends = (self.document[len(prompt):], True) if self.document.startswith(prompt) else (OFF_DOCUMENT, False)
        tokens = word_tokens(rest)
        out, finish = [], {"type": "stop", "matched": None}
        for token in tokens[: params.get("max_new_tokens", 128)]:
            out.append(token)
            text = "".join(out)
            stops = [s for s in params.get("stop") or [] if s in text]
            if stops:
                cut = min(text.find(s) for s in stops)
                return text[:cut], {"finish_reason": {"type": "stop", "matched": stops[0]}}
        if len(out) < len(tokens) or not ends:
            finish = {"type": "length", "matched": None}
        meta = {"finish_reason": finish}
        if logprob.get("return_logprob"):
            meta["output_token_logprobs"] = [(-0.1, None, t) for t in out]
        return "".join(out), meta


@sgl.function
def character(s):
    s += "Construct a character.\nName: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n\n"
    s += "Now a new one.\n"
    s += "Name:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("birthday", stop="\n")
    s += "\nJob:" + sgl.gen("job", stop="\n", max_tokens=2) + "\n"


def run_both(program, **kwargs):
    """The program's state and calls without speculation and with num_api_spec_tokens=64."""
    results = []
    for spec_tokens in (None, 64):
        backend = DocumentModel()
        fn = sgl.SglFunction(program.func, num_api_spec_tokens=spec_tokens)
        results.append((fn.run(backend=backend, temperature=0, **kwargs), backend.calls))
    return results


def test_speculation_gives_the_values_of_normal_execution_with_one_call():
    (plain, plain_calls), (spec, spec_calls) = run_both(character)
    assert plain.error() is None and spec.error() is None
    values = {k: plain[k] for k in ("name", "birthday", "job")}
    assert values == {"name": " Ada Lovelace", "birthday": " December 10, 1815", "job": " mathematician and"}
    assert {k: spec[k] for k in values} == values and spec.text() == plain.text()
    assert len(plain_calls) == 3 and len(spec_calls) == 1
    # The one call asked for max(num_api_spec_tokens, the gen's max_tokens: run's default 128) tokens and no stop,
    # from where the first gen starts.
    assert spec_calls[0]["max_new_tokens"] == 128 and spec_calls[0]["stop"] == []
    assert spec_calls[0]["prompt"] == plain_calls[0]["prompt"]


def test_a_mismatch_drops_the_speculation_and_the_next_gen_calls_again():
    @sgl.function
    def diverging(s):
        s += "Construct a character.\nName: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n\n"
        s += "Now a new one.\nName:" + sgl.gen("name", stop="\n")
        s += "\nHobby:" + sgl.gen("hobby", stop="\n", max_tokens=4)  # the document says "Birthday:"

    (plain, plain_calls), (spec, spec_calls) = run_both(diverging)
    assert spec["name"] == plain["name"] == " Ada Lovelace"
    assert spec["hobby"] == plain["hobby"] == " lorem ipsum dolor sit"
    assert len(spec_calls) == 2 and spec_calls[1]["prompt"].endswith("\nHobby:")


def test_a_speculation_too_short_for_the_gen_is_extended_by_a_new_call():
    @sgl.function
    def long_gen(s):
        s += "Now a new one.\nName:" + sgl.gen("rest", max_tokens=12)

    backend = DocumentModel("Now a new one.\nName: " + " ".join(f"w{i}" for i in range(40)))
    state = sgl.SglFunction(long_gen.func, num_api_spec_tokens=4).run(backend=backend, temperature=0)
    assert state["rest"] == "".join(f" w{i}" for i in range(12))  # 12 tokens, not the 4 speculated
    assert [c["max_new_tokens"] for c in backend.calls] == [12]


def test_select_and_role_text_consume_the_speculation_too():
    @sgl.function
    def with_select(s):
        s += "Now a new one.\nName:" + sgl.gen("name", stop="\n") + "\n"
        s += sgl.select("field", ["Birthday", "Motto"]) + ":" + sgl.gen("value", stop="\n")

    class Chooser(DocumentModel):
        def select(self, text, choices, temperature, method):
            return ChoicesDecision(choices[0], {})

    backend = Chooser(DOCUMENT[DOCUMENT.index("Now"):])
    state = sgl.SglFunction(with_select.func, num_api_spec_tokens=64).run(backend=backend, temperature=0)
    assert state["field"] == "Birthday" and state["value"] == " December 10, 1815"
    assert len(backend.calls) == 1  # the select's text was consumed like constant text


def test_constrained_gens_and_streams_do_not_speculate():
    @sgl.function
    def constrained(s):
        s += "Now a new one.\nName:" + sgl.gen("name", stop="\n") + "\nBirthday:" + sgl.gen("b", regex=r" \w+")

    backend = DocumentModel(DOCUMENT[DOCUMENT.index("Now"):])
    sgl.SglFunction(constrained.func, num_api_spec_tokens=64).run(backend=backend, temperature=0)
    assert "regex" in backend.calls[1]
    backend = DocumentModel()
    state = sgl.SglFunction(character.func, num_api_spec_tokens=64).run(backend=backend, temperature=0,
                                                                      stream=True)
    "".join(state.text_iter())
    assert len(backend.calls) == 3


def test_concurrent_programs_never_share_speculative_state():
    @sgl.function
    def person(s, intro, field):
        s += intro + "Name:" + sgl.gen("name", stop="\n") + f"\n{field}:" + sgl.gen("value", stop="\n")

    # Programs whose text follows the document to different depths, and one that leaves it at once.
    intros = {"Construct a character.\n": "Birthday",
              "Construct a character.\nName: Steve Jobs.\nBirthday: February 24, 1955.\nJob: Apple CEO.\n\n"
              "Now a new one.\n": "Birthday", "Construct a character.\n\n": "Job"}
    batch = [{"intro": i, "field": f} for i, f in intros.items()] * 4
    sequential = [person.run(backend=DocumentModel(), temperature=0, **kw) for kw in batch]
    assert {s["name"] for s in sequential} == {" Steve Jobs.", " Ada Lovelace", " lorem ipsum dolor sit amet "
                                               "consectetur adipiscing elit sed do eiusmod tempor"}
    backend = DocumentModel()
    spec = sgl.SglFunction(person.func, num_api_spec_tokens=64)
    states = spec.run_batch(batch, backend=backend, temperature=0, num_threads=8)
    assert [(s["name"], s["value"]) for s in states] == [(s["name"], s["value"]) for s in sequential]
    assert len(backend.calls) < 2 * len(batch)


class ChatModel(BaseBackend):
    """A chat API model: answers each conversation with `answers[last user message]`, recording the
    conversations; `prefill` says whether it continues a partial assistant message."""

    is_chat_model = True
    api_speculative_execution = True

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.chat_template = get_chat_template("chatgpt")
        self.calls: list[list[dict]] = []

    def generate(self, prompt, params, logprob):
        self.calls.append(list(prompt))
        last_user = [m["content"] for m in prompt if m["role"] == "user"][-1]
        answer = self.answers[last_user]
        if prompt[-1]["role"] == "assistant":  # continue the partial message
            answer = answer.removeprefix(prompt[-1]["content"])
        stops = [s for s in params.get("stop") or [] if s in answer]
        if stops:
            answer = answer[: min(answer.find(s) for s in stops)]
        return answer, {}


def chat_character(s):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user("Make a character.")
    s += sgl.assistant("Name:" + sgl.gen("name", stop="\n") + "\nAge:" + sgl.gen("age", stop="\n")
                       + "\nJob:" + sgl.gen("job", stop="\n"))


def test_chat_speculation_fills_an_assistant_turn_from_one_call():
    answers = {"Make a character.": "Name: Ada\nAge: 36\nJob: mathematician"}
    plain_backend, spec_backend = ChatModel(answers), ChatModel(answers)
    plain = sgl.function(chat_character).run(backend=plain_backend, temperature=0)
    spec = sgl.function(num_api_spec_tokens=64)(chat_character).run(backend=spec_backend, temperature=0)
    assert [spec[k] for k in ("name", "age", "job")] == [plain[k] for k in ("name", "age", "job")] == [
        " Ada", " 36", " mathematician"]
    assert len(plain_backend.calls) == 3 and len(spec_backend.calls) == 1
    assert spec_backend.calls[0] == [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": "Make a character."}]
    assert spec.messages() == plain.messages()
    assert spec.messages()[-1] == {"role": "assistant", "content": "Name: Ada\nAge: 36\nJob: mathematician"}


def test_chat_speculation_runs_the_rest_normally_where_the_answer_leaves_the_pattern():
    answers = {"Make a character.": "Name: Ada\nBorn: 1815\nAge: 36\nJob: poet"}
    backend = ChatModel(answers)
    state = sgl.function(num_api_spec_tokens=64)(chat_character).run(backend=backend, temperature=0)
    assert state["name"] == " Ada"  # matched, from the one call
    assert state.error() is None and len(backend.calls) == 3  # the spec call, then "age" and "job" as usual
    assert backend.calls[1][-1] == {"role": "assistant", "content": "Name: Ada\nAge:"}


def test_a_turn_of_one_gen_runs_as_usual():
    @sgl.function(num_api_spec_tokens=64)
    def lone(s):
        s += sgl.user("Make a character.")
        s += sgl.assistant(sgl.gen("all", max_tokens=5, stop="\n"))

    backend = ChatModel({"Make a character.": "Name: Ada\nAge: 36"})
    calls = []
    backend.generate = lambda prompt, params, logprob: (calls.append(params), ("Name: Ada", {}))[1]
    assert lone.run(backend=backend)["all"] == "Name: Ada"
    assert [(c["max_new_tokens"], c["stop"]) for c in calls] == [(5, "\n")]  # the gen's own, not the turn's


def test_reading_a_variable_inside_the_turn_fills_the_turn_at_that_point():
    def reads_early(s):
        s += sgl.user("Make a character.")
        with s.assistant():
            s += "Name:" + sgl.gen("name", stop="\n")
            s += "\nAge:" + (" 36" if s["name"] == " Ada" else " ?")  # the program's thread reads the name

    answers = {"Make a character.": "Name: Ada\nAge: 36"}
    backend = ChatModel(answers)
    state = sgl.function(num_api_spec_tokens=64)(reads_early).run(backend=backend, temperature=0)
    assert state.error() is None and state["name"] == " Ada"
    assert state.messages()[-1]["content"] == "Name: Ada\nAge: 36" and len(backend.calls) == 1


def test_a_program_without_roles_is_one_user_message_on_a_chat_model():
    @sgl.function
    def no_roles(s):
        s += "Say hi." + sgl.gen("x")

    backend = ChatModel({"Say hi.": "hi"})
    assert no_roles.run(backend=backend)["x"] == "hi"
    assert backend.calls == [[{"role": "user", "content": "Say hi."}]]


def test_images_go_as_content_parts_of_their_message(tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(b"\x89PNG fake")

    @sgl.function
    def describe(s):
        s += sgl.user(sgl.image(str(image)) + "What is this?")
        s += sgl.assistant(sgl.gen("answer"))

    class Seeing(ChatModel):
        def supports_images(self):
            return True

    backend = Seeing({"What is this?": "A dot."})
    # the scripted model looks up the answer by text: give it the message's text part
    backend.generate = lambda prompt, params, logprob: (backend.calls.append(prompt) or "A dot.", {})
    state = describe.run(backend=backend)
    assert state["answer"] == "A dot."
    content = backend.calls[0][0]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "What is this?"}


def test_a_missing_image_file_is_a_clear_error():
    class Seeing(ChatModel):
        def supports_images(self):
            return True

    @sgl.function
    def bad(s):
        s += sgl.user(sgl.image("/nonexistent/cat.png") + "?")

    with pytest.warns(RuntimeWarning, match="primitive failed"):
        state = bad.run(backend=Seeing({}))
    assert "not a file, an http(s) URL or a data: URL" in str(state.error())


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_num_api_spec_tokens_must_be_positive(value):
    with pytest.raises(ValueError, match="num_api_spec_tokens"):
        sgl.function(num_api_spec_tokens=value)(chat_character)
