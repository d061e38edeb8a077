"""The tree's shape: no import cycles between modules. (The layers between packages are
import-linter's contracts in setup.cfg, checked by `lint-imports` in `make test`.)"""

from __future__ import annotations

from collections.abc import Mapping, Set

import grimp
import pytest

PACKAGES = (
    "protocol",
    "common",
    "toolchain",
    "edge_agent",
    "fleet_server",
    "models",
    "devfleet",
    "demo",
    "bench",
    "tests",
)


def cycles(imports: Mapping[str, Set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or in a ring (Tarjan's
    strongly connected components of more than one module, or one importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(imports.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(group) > 1 or module in imports.get(module, ()):
                found.append(sorted(group))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


@pytest.mark.parametrize(
    ("imports", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"a"}}, [["a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_cycles_are_found(imports: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert sorted(cycles(imports)) == expected


def test_no_module_imports_itself_back_through_others() -> None:
    # TYPE_CHECKING imports count: a cycle closed only for the type checker is still one.
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    imports = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert cycles(imports) == []
