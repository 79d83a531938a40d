"""The scripts package has no import cycle (one was datasets <-> synthetic): modules import downwards, by stage."""

import ast

from conftest import BUNDLE


def import_graph() -> dict[str, set[str]]:
    """Module -> the bundle modules it imports anywhere in its code (module level or inside functions)."""
    root = BUNDLE / "scripts"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(BUNDLE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"
        stack.pop()

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_scripts_package_has_no_import_cycle():
    graph = import_graph()
    assert {"scripts.pipeline", "scripts.data.demo", "scripts.wsi.inference"} <= set(graph)
    assert "scripts.data.adapters" in graph["scripts.data.demo"]  # the graph sees relative imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
