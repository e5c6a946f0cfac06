"""Detokenization and stop strings with a toy vocabulary (no model)."""

from __future__ import annotations

from types import SimpleNamespace

from radixflow.runtime.scheduler.output import TextTracker
from radixflow.runtime.tokenizer import IncrementalDetokenizer

VOCAB = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "\n", 5: "##", 6: "#", 7: " END", 8: "E", 9: "ND", 10: "x"}


class ToyBackend:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(VOCAB[i] for i in ids)


TOKENIZER = SimpleNamespace(backend_tokenizer=ToyBackend())


def track(tokens, stops):
    tracker = TextTracker(IncrementalDetokenizer(TOKENIZER, [10, 10], True), stops)
    pieces, matched = [], None
    for t in tokens:
        matched = tracker.push(t)
        if matched:
            break
        pieces.append(tracker.take(final=False))
    pieces.append(tracker.take(final=True))
    return "".join(pieces), pieces, matched


def test_no_stop_passes_text_through():
    text, _, matched = track([0, 1, 2, 3], [])
    assert text == "Hello world" and matched is None


def test_stop_string_split_across_tokens_is_caught_and_trimmed():
    text, _, matched = track([0, 1, 4, 5, 6, 2], ["###"])
    assert matched == "###"
    assert text == "Hello\n"


def test_stop_string_inside_one_token():
    text, _, matched = track([0, 1, 7, 2], ["END"])
    assert matched == "END" and text == "Hello "


def test_partial_stop_is_held_back_then_released():
    tracker = TextTracker(IncrementalDetokenizer(TOKENIZER, [], True), ["END!"])
    tracker.push(0)
    assert tracker.take(final=False) == "Hel"
    tracker.push(8)  # "E" could start "END!"
    assert tracker.take(final=False) == ""
    tracker.push(9)  # "END" still could
    assert tracker.take(final=False) == ""
    tracker.push(3)  # "ENDld" cannot: released
    assert tracker.take(final=False) == "ENDld"


def test_streamed_pieces_never_contain_trimmed_text():
    _, pieces, matched = track([0, 8, 9, 2], [" END", "END"])
    assert matched == "END"
    assert "".join(pieces) == "Hel"


class ByteBackend:
    """Decodes ids as UTF-8 bytes, producing U+FFFD for incomplete characters like a byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_waits_for_complete_characters():
    detok = IncrementalDetokenizer(SimpleNamespace(backend_tokenizer=ByteBackend()), [], True)
    euro = "€".encode()
    assert detok.append(euro[0]) == ""
    assert detok.append(euro[1]) == ""
    assert detok.append(euro[2]) == "€"
    assert detok.append(ord("a")) == "a"
