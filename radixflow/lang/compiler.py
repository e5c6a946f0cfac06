"""Compilation: a program traced once into a graph, optimised, then run by a graph executor.

`fn.compile(**kwargs)` traces `fn` (the arguments given are fixed; the others stay parameters of the compiled
function) and returns a `CompiledFunction` (function.py). Its `run` / `run_batch` are SglFunction's own: a
`GraphProgram` (here) stands in for the program function and replays the graph's nodes onto the real
`ProgramState`, so stream executors, fork, join, streaming and errors are exactly the interpreter's. The Python
function does not run again, so `state.ret_value` is None.

Passes over the graph:
- constant-prefix prefetch (always): before a batch, the graph's argument-independent prefix (text and role markers
  rendered with the backend's chat template) is sent once with `backend.cache_prefix`, so every program of the batch
  finds it in the radix cache instead of all computing it at once.
- hoisting (`compile(hoist_constants=True)`, opt-in because it changes the prompt): declares the program's leading
  text statements order-insensitive, i.e. the `s += ...` statements before the first one that holds anything but
  text and arguments (no role, generation, variable or fork). Those made only of constant text move, in order, ahead
  of those that use arguments, so the constant text joins the shared prefix. Use it for a prompt assembled from
  independent parts (instructions, a document, a question).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from radixflow.lang.graph import ArgumentUse, Kind, Step, TracedProgram, substitute_fields
from radixflow.lang.ir import Text, as_node


class GraphProgram:
    """A program function that replays a traced graph onto the state it is given."""

    def __init__(self, graph: TracedProgram):
        self.graph = graph
        self.__name__ = graph.name
        self.__signature__ = graph.signature  # what inspect.signature reports: run_batch maps argument tuples by it

    def __call__(self, s, *args, **kwargs) -> None:
        bound = self.graph.signature.bind(s, *args, **kwargs)  # Python's own errors for missing/unknown arguments
        bound.apply_defaults()
        replay = _Replay(bound.arguments, {0: s})
        for node in self.graph.nodes:  # program order: every edge points back, so this is a dependency order
            _STEPS[node.kind](replay, node)


@dataclass
class _Replay:
    values: dict  # argument name -> value
    states: dict  # stream -> its state
    groups: dict = field(default_factory=dict)  # a fork's child streams -> the group fork() returned


def _append(replay: _Replay, node) -> None:
    replay.states[node.stream] += node.payload


def _append_with_arguments(replay: _Replay, node) -> None:
    """Gen / select / image: their parameters may be arguments."""
    def fill(value):
        return replay.values[value.name] if isinstance(value, ArgumentUse) else value
    replay.states[node.stream] += substitute_fields(node.payload, fill)


def _appended(value, spec: str | None):
    """As the interpreter would have it: `s += value` takes a node or str, an f-string formats the value."""
    return as_node(value) if spec is None else Text(format(value, spec))


def _argument(replay: _Replay, node) -> None:
    use = node.payload
    replay.states[node.stream] += _appended(replay.values[use.name], use.spec)


def _variable(replay: _Replay, node) -> None:
    use = node.payload
    replay.states[node.stream] += _appended(replay.states[use.source][use.name], use.spec)  # waits for it


def _fork(replay: _Replay, node) -> None:
    group = replay.states[node.stream].fork(node.payload.size)
    replay.groups[node.payload.children] = group
    replay.states.update(zip(node.payload.children, group))


def _join(replay: _Replay, node) -> None:
    replay.groups[node.payload.children].join(node.payload.mode)


def _set_var(replay: _Replay, node) -> None:
    replay.states[node.stream][node.payload.name] = node.payload.value


_STEPS = {Kind.TEXT: _append, Kind.ROLE_BEGIN: _append, Kind.ROLE_END: _append, Kind.VAR_SCOPE_BEGIN: _append,
          Kind.VAR_SCOPE_END: _append, Kind.GEN: _append_with_arguments, Kind.SELECT: _append_with_arguments,
          Kind.IMAGE: _append_with_arguments, Kind.ARGUMENT: _argument, Kind.VARIABLE: _variable, Kind.FORK: _fork,
          Kind.JOIN: _join, Kind.SET_VAR: _set_var}


def hoist_constant_text(graph: TracedProgram) -> TracedProgram:
    """Within the leading text statements (see the module docstring), move those of constant text ahead of those
    using arguments; each group keeps its order."""
    steps = graph.steps()
    end = next((i for i, step in enumerate(steps) if not isinstance(step.payload, (Text, ArgumentUse))), len(steps))
    if end < len(steps):
        while end > 0 and steps[end - 1].statement == steps[end].statement:  # a statement moves whole or not at all
            end -= 1
    statements: dict[int, list[Step]] = {}
    for step in steps[:end]:
        statements.setdefault(step.statement, []).append(step)
    constant = [group for group in statements.values() if all(isinstance(s.payload, Text) for s in group)]
    dependent = [group for group in statements.values() if not all(isinstance(s.payload, Text) for s in group)]
    return graph.with_steps([step for group in constant + dependent for step in group] + steps[end:])
