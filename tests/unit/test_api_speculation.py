"""API speculative execution's bookkeeping (radixflow/lang/speculative.py), without a backend."""

from __future__ import annotations

from radixflow.lang.ir import Gen, Select, Text
from radixflow.lang.speculative import ChatTurn, Speculation, Term

TOKENS = [" Ada", " Love", "lace", "\n", "Age", ":", " 36", "\n", "Job", ":"]
TEXT = "".join(TOKENS)


def spec(finished: bool = False, tokens=TOKENS) -> Speculation:
    return Speculation.from_output("".join(tokens), tokens, finished)


def test_take_ends_at_the_earliest_stop_within_the_token_limit():
    assert spec().take(["\n"], 16) == " Ada Lovelace"
    assert spec().take([":", "\n"], 16) == " Ada Lovelace"  # the earliest of the stops
    # The stop "ge:" completes in token 6 (":"): within 6 tokens it cuts there; with a limit of 5 tokens normal
    # decoding would have stopped at the limit, before seeing it.
    assert spec().take(["ge:"], 6) == " Ada Lovelace\nA"
    assert spec().take(["ge:"], 5) == " Ada Lovelace\nAge"
    assert spec().take(["\n"], 2) == " Ada Love"


def test_take_without_a_stop_needs_more_unless_the_model_ended_or_the_limit_is_reached():
    assert spec().take(["Name"], 32) is None  # undetermined: the gen would go on past this speculation
    assert spec().take(["Name"], 32, final=True) == TEXT
    assert spec(finished=True).take(["Name"], 32) == TEXT  # the model stopped here (EOS)
    assert spec().take([], 5) == " Ada Lovelace\nAge"


def test_consume_follows_the_program_and_drops_the_rest_at_a_mismatch():
    rest = spec().consume(" Ada Lovelace")
    assert rest.text == "\nAge: 36\nJob:" and rest.token_ends[0] == 1  # "\n" is its next token
    assert rest.consume("\nAge:").take(["\n"], 1) == " 36"
    assert spec().consume(" Grace") is None


def test_a_partly_consumed_token_still_counts_as_one():
    rest = spec().consume(" Ad")  # a program's constant text that ends inside a token
    assert rest.text.startswith("a Love") and rest.take([], 1) == "a"


def test_token_texts_that_do_not_rebuild_the_text_leave_the_limit_unknown():
    odd = Speculation.from_output("héllo world", ["h", "\xc3", "llo world"], False)
    assert odd.token_ends is None
    assert odd.take([], 1) is None and odd.take([], 1, final=True) == "héllo world"


def turn(*terms: Term) -> ChatTurn:
    return ChatTurn(list(terms))


def text(value: str) -> Term:
    return Term(Text(value), text=value, is_constant=True)


def gen(name: str, *stops: str) -> Term:
    return Term(Gen(name), name=name, stops=list(stops))


def test_a_turn_fills_gens_between_its_constant_text():
    t = turn(text("Name:"), gen("name", "\n"), text("\nAge:"), gen("age"), text("\nJob:"), gen("job"))
    assert t.needs_call and t.pending("age") and not t.pending("city")
    assert t.match("Name: Ada\nAge: 36\nJob: poet and more") == 6
    assert [x.text for x in t.terms if not x.is_constant] == [" Ada", " 36", " poet and more"]


def test_a_turn_reports_where_the_answer_left_the_pattern():
    t = turn(text("Name:"), gen("name", "\n"), text("\nAge:"), gen("age", "\n"))
    assert t.match("Name: Ada\nBorn: 1815") == 2  # "Name:" and the name matched; "\nAge:" did not
    assert t.terms[1].text == " Ada"
    assert turn(text("Name:"), gen("a"), gen("b")).match("Name: Ada") == 1  # two gens in a row: no boundary


def test_a_select_in_a_turn_takes_the_choice_the_answer_continues_with():
    t = turn(text("Verdict: "), Term(Select("v", ["yes", "yes, but"]), name="v", choices=["yes", "yes, but"]),
             text("."))
    assert t.match("Verdict: yes, but.") == 3 and t.terms[1].text == "yes, but"
    assert turn(text("A: "), Term(Select("v", ["x"]), name="v", choices=["x"])).match("A: y") == 1


def test_a_turn_of_constant_text_needs_no_call():
    assert not turn(text("Hello."), text(" Bye.")).needs_call
