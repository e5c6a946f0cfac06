"""API speculative execution (the SGLang paper, section 4 "API speculative execution"): with
`@function(num_api_spec_tokens=N)`, a program on an API model makes fewer calls by asking one call for more than one
primitive needs and letting later primitives consume the surplus.

Completion models (`Speculation`): a `gen` asks for max(N, its max_tokens) tokens without its stop strings. The gen
takes its output from that text (up to its stop, or its token limit), and everything the program appends afterwards
(constant text, role markers, the next gens) consumes the rest while it matches; at the first mismatch the surplus
is dropped and the next gen calls the API again. With greedy sampling the values are those of normal execution.

Chat models (`ChatTurn`): a chat API cannot continue a half-written assistant message, so the program's text and
gens inside one `assistant()` turn are collected and filled from one call at the end of the turn, when the answer
follows the program's pattern (the constant text in place, each gen ending at its stop or where the next constant
text begins).

Both are plain data owned by one program's executor: concurrent programs never share speculative state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Speculation:
    """Text an API call produced beyond what the program has consumed so far."""

    text: str
    token_ends: tuple[int, ...] | None  # end offset in `text` of each of its tokens, when the API told them
    finished: bool  # the model ended (EOS) right after `text`: nothing more would be generated

    @classmethod
    def from_output(cls, text: str, token_texts: list[str] | None, finished: bool) -> Speculation:
        ends = None
        if token_texts and "".join(token_texts) == text:  # token texts that do not rebuild the text (split UTF-8
            ends, total = [], 0                            # characters) leave the token count unknown
            for token in token_texts:
                total += len(token)
                ends.append(total)
        return cls(text, tuple(ends) if ends is not None else None, finished)

    def consume(self, appended: str) -> Speculation | None:
        """What is left after the program appended `appended`; None where it diverged from the speculation."""
        if not self.text.startswith(appended):
            return None
        n = len(appended)
        ends = None if self.token_ends is None else tuple(e - n for e in self.token_ends if e > n)
        return replace(self, text=self.text[n:], token_ends=ends)

    def take(self, stops: list[str], max_tokens: int, final: bool = False) -> str | None:
        """A gen's output, if this speculation determines it: the text up to the earliest stop when the stop is
        complete within `max_tokens` tokens; else the first `max_tokens` tokens; else all of it when the model
        ended. None when more output is needed (with `final`, what there is: a provider that gives no token
        texts leaves the token limit unknown)."""
        cap = (self.token_ends[max_tokens - 1] if self.token_ends is not None and len(self.token_ends) >= max_tokens
               else None)
        found = [(self.text.find(s), s) for s in stops if s and s in self.text]
        if found:
            position, stop = min(found)
            if cap is None or position + len(stop) <= cap:
                return self.text[:position]
        if cap is not None:
            return self.text[:cap]
        if self.finished or final:
            return self.text
        return None


@dataclass
class Term:
    """One piece of an assistant turn under speculation: constant text, a gen (its name and stops), or a select
    (its name and choices); `node` is the primitive, run as usual where the answer does not match."""

    node: Any
    text: str = ""  # given (constant), or filled by `ChatTurn.match`
    name: str | None = None
    stops: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    is_constant: bool = False


@dataclass
class ChatTurn:
    """The assistant turn being collected: its terms, and the sampling params its one call will use."""

    terms: list[Term] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def needs_call(self) -> bool:
        return any(not t.is_constant for t in self.terms)

    @property
    def worth_speculating(self) -> bool:
        """A turn of one gen (or select) and nothing else is one call either way: it runs as usual."""
        return self.needs_call and len(self.terms) > 1

    def pending(self, name: str) -> bool:
        return any(t.name == name for t in self.terms)

    def match(self, answer: str) -> int:
        """Fill each term's text from `answer` in order; returns how many terms matched (all of them: success).
        A gen ends at its earliest stop, else where the next constant text begins, else (the last term) at the
        end of the answer; a select takes the choice the answer continues with (the longest, if several)."""
        rest = answer
        for i, term in enumerate(self.terms):
            if term.is_constant:
                if not rest.startswith(term.text):
                    return i
                rest = rest[len(term.text):]
            elif term.choices is not None:
                fitting = [c for c in term.choices if rest.startswith(c)]
                if not fitting:
                    return i
                term.text = max(fitting, key=len)
                rest = rest[len(term.text):]
            else:
                end = _gen_end(rest, term.stops, self.terms[i + 1] if i + 1 < len(self.terms) else None)
                if end is None:
                    return i
                term.text, rest = rest[:end], rest[end:]
        return len(self.terms)


def _gen_end(rest: str, stops: list[str], following: Term | None) -> int | None:
    positions = [rest.find(s) for s in stops if s and s in rest]
    if positions:
        return min(positions)
    if following is None:
        return len(rest)
    if following.is_constant and following.text and following.text in rest:
        return rest.find(following.text)
    return None
