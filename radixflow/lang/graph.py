"""A traced program as a graph: what `SglFunction.trace()` returns and `compile()` optimises and runs.

Each node is one flattened IR node (or a fork, join or set_var) on one stream: stream 0 is the program's state,
each child of `fork(n)` is a stream of its own. Edges are explicit: a node depends on the previous node of its
stream (a child's first node on the fork), a node that appends variable `x` on the node that produced `x`, a
join on the last node of each child. Node ids follow program order, which is a dependency order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from radixflow.lang.chat_template import RoleTemplate
from radixflow.lang.ir import Gen, Image, RoleBegin, RoleEnd, Select, Text, VarScopeBegin, VarScopeEnd


class TracingError(RuntimeError):
    """The program cannot be traced: its Python code needs a value only a run has (a generated variable, or an
    argument used as more than text)."""


# -- payloads a graph holds besides IR nodes --------------------------------------------------------------------
@dataclass(frozen=True)
class ArgumentUse:
    """A program argument appended to the text: as a node (`s += question`, spec None) or formatted into a
    string (`f"Q: {question}"`, `"Q: " + str(question)`; spec is the format spec, often "")."""

    name: str
    spec: str | None = None


@dataclass(frozen=True)
class VariableUse:
    """`s += s["x"]` (or `f"... {s['x']}"`): the value of variable `name` of stream `source`, appended."""

    name: str
    source: int
    spec: str | None = None


@dataclass(frozen=True)
class Fork:
    size: int
    children: tuple[int, ...]  # the child streams


@dataclass(frozen=True)
class Join:
    children: tuple[int, ...]
    mode: str


@dataclass(frozen=True)
class SetVar:
    name: str
    value: Any


class Kind(StrEnum):
    TEXT = "text"
    ARGUMENT = "argument"
    VARIABLE = "variable"
    GEN = "gen"
    SELECT = "select"
    ROLE_BEGIN = "role_begin"
    ROLE_END = "role_end"
    VAR_SCOPE_BEGIN = "var_scope_begin"
    VAR_SCOPE_END = "var_scope_end"
    IMAGE = "image"
    FORK = "fork"
    JOIN = "join"
    SET_VAR = "set_var"


KIND_OF = {Text: Kind.TEXT, ArgumentUse: Kind.ARGUMENT, VariableUse: Kind.VARIABLE, Gen: Kind.GEN,
           Select: Kind.SELECT, RoleBegin: Kind.ROLE_BEGIN, RoleEnd: Kind.ROLE_END,
           VarScopeBegin: Kind.VAR_SCOPE_BEGIN, VarScopeEnd: Kind.VAR_SCOPE_END, Image: Kind.IMAGE, Fork: Kind.FORK,
           Join: Kind.JOIN, SetVar: Kind.SET_VAR}


@dataclass(frozen=True)
class Step:
    """One recorded node before edges are known; `statement` counts the state calls (`s += ...`, fork, ...)
    so a pass can move whole statements."""

    stream: int
    payload: Any
    statement: int


@dataclass(frozen=True)
class GraphNode:
    id: int
    kind: Kind
    stream: int
    payload: Any  # an IR node (Text, Gen, ...) or ArgumentUse / VariableUse / Fork / Join / SetVar
    deps: tuple[int, ...]
    produces: tuple[str, ...] = ()  # the variables this node sets
    statement: int = 0


@dataclass
class TracedProgram:
    """What `SglFunction.trace()` returns: the nodes in program order, their edges, and the arguments."""

    name: str
    signature: inspect.Signature  # the state `s`, then the arguments left symbolic (with their defaults)
    bound: dict[str, Any]  # the arguments traced with concrete values
    nodes: list[GraphNode]
    stopped: BaseException | None = None  # a partial trace: what stopped it (the nodes before it are exact)
    streams: dict[int, int | None] = field(default_factory=dict)  # stream -> the fork node that opened it

    @classmethod
    def build(cls, name: str, signature: inspect.Signature, bound: dict, steps: list[Step],
              stopped: BaseException | None = None) -> TracedProgram:
        """Number the steps and derive every node's dependencies and produced variables."""
        nodes: list[GraphNode] = []
        last: dict[int, int] = {}  # stream -> its latest node
        opened_by: dict[int, int | None] = {0: None}  # stream -> fork node
        producers: dict[int, dict[str, int]] = {0: {}}  # stream -> variable -> the node that set it (as seen there)
        for step in steps:
            node_id, stream, payload = len(nodes), step.stream, step.payload
            previous = last.get(stream, opened_by[stream])
            deps = [] if previous is None else [previous]
            produces: tuple[str, ...] = ()
            match payload:
                case VariableUse(name=variable, source=source):
                    if variable not in producers[source]:
                        raise TracingError(f"variable {variable!r} is appended before anything produces it")
                    deps.append(producers[source][variable])
                case Fork(children=children):
                    for child in children:
                        opened_by[child] = node_id
                        producers[child] = dict(producers[stream])  # a child sees the parent's variables at the fork
                case Join(children=children, mode=mode):
                    deps += [last[child] for child in children if child in last]
                    if mode == "gather_variable":  # as the interpreter: what the children set, new to the parent
                        produces = tuple(sorted({variable for child in children
                                                 for variable, at in producers[child].items()
                                                 if nodes[at].stream == child and variable not in producers[stream]}))
                case _:
                    produces = _produced(payload)
            for variable in produces:
                producers[stream][variable] = node_id
            nodes.append(GraphNode(node_id, KIND_OF[type(payload)], stream, payload, tuple(dict.fromkeys(deps)),
                                   produces, step.statement))
            last[stream] = node_id
        return cls(name, signature, bound, nodes, stopped, opened_by)

    def steps(self) -> list[Step]:
        return [Step(n.stream, n.payload, n.statement) for n in self.nodes]

    def with_steps(self, steps: list[Step]) -> TracedProgram:
        """The same program with its steps rearranged (by an optimisation pass); edges are derived again."""
        return TracedProgram.build(self.name, self.signature, self.bound, steps, self.stopped)

    # -- inspection ------------------------------------------------------------------------------------------
    @property
    def parameters(self) -> list[str]:
        """The symbolic arguments, in signature order."""
        return list(self.signature.parameters)[1:]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def node(self, node_id: int) -> GraphNode:
        return self.nodes[node_id]

    def deps(self, node: GraphNode | int) -> list[GraphNode]:
        node = self.nodes[node] if isinstance(node, int) else node
        return [self.nodes[i] for i in node.deps]

    def stream_nodes(self, stream: int = 0) -> list[GraphNode]:
        return [n for n in self.nodes if n.stream == stream]

    def kinds(self, stream: int | None = None) -> list[str]:
        return [str(n.kind) for n in self.nodes if stream is None or n.stream == stream]

    def constant_prefix(self, template: RoleTemplate) -> str:
        """The text every run starts with whatever its arguments: stream 0's text and role markers (rendered with
        `template` exactly as the interpreter renders them) up to the first argument, generation, variable,
        image or fork. Every text the program sends to the backend starts with it."""
        pieces = []
        for node in self.stream_nodes(0):
            match node.payload:
                case Text(value=value):
                    pieces.append(value)
                case RoleBegin(role=role):
                    pieces.append(template.prefix(role))
                case RoleEnd(role=role):
                    pieces.append(template.suffix(role))
                case VarScopeBegin() | VarScopeEnd() | SetVar():
                    pass  # no text
                case _:
                    break
        return "".join(pieces)

    def pretty(self) -> str:
        stopped = f"  [partial: stopped by {self.stopped!r}]" if self.stopped else ""
        lines = [f"{self.name}({', '.join(self.parameters)}){stopped}"]
        for n in self.nodes:
            deps = f"  <- {', '.join(f'#{d}' for d in n.deps)}" if n.deps else ""
            produces = f"  -> {', '.join(n.produces)}" if n.kind is Kind.JOIN and n.produces else ""
            lines.append(f"  #{n.id:<3} s{n.stream:<2} {n.kind:<15} {_label(n.payload)}{produces}{deps}")
        return "\n".join(lines)

    __str__ = pretty


def substitute(value, leaf):
    """`value` with `leaf` applied to each item of its lists, tuples and dict values (recursively)."""
    if isinstance(value, dict):
        return {key: substitute(item, leaf) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(substitute(item, leaf) for item in value)
    return leaf(value)


def substitute_fields(node, leaf):
    """An IR node (a dataclass) with `substitute` applied to each of its fields."""
    return replace(node, **{f.name: substitute(getattr(node, f.name), leaf) for f in fields(node)})


def _produced(payload) -> tuple[str, ...]:
    match payload:
        case Gen(name=str(name)) | Select(name=str(name)) | VarScopeEnd(name=name) | SetVar(name=name):
            return (name,)
    return ()


def _label(payload) -> str:
    match payload:
        case Text(value=value):
            text = repr(value)
            return text if len(text) <= 48 else text[:44] + "...'"
        case ArgumentUse(name=name, spec=None):
            return name
        case ArgumentUse(name=name, spec=spec):
            return f"{{{name}{':' + spec if spec else ''}}}"
        case VariableUse(name=name, source=source):
            return f"s{source}[{name!r}]"
        case Gen(name=name, params=params):
            return f"{name} {({k: v for k, v in params.items() if v is not None})}"
        case Select(name=name, choices=choices):
            return f"{name} {choices}"
        case RoleBegin(role=role) | RoleEnd(role=role):
            return role
        case VarScopeBegin(name=name) | VarScopeEnd(name=name):
            return name
        case Image(path=path):
            return path
        case Fork(size=size, children=children):
            return f"{size} -> streams {', '.join(f's{c}' for c in children)}"
        case Join(children=children, mode=mode):
            return f"{mode} <- streams {', '.join(f's{c}' for c in children)}"
        case SetVar(name=name, value=value):
            return f"{name} = {value!r}"
    return repr(payload)
