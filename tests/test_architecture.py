"""The architecture's rules, checked the way any reader could check them by hand.

Every module's source is parsed with ``ast`` (nothing is imported), so these run in well under a
second. The rules are the ones docs/architecture.md and CONTRIBUTING.md state:

- Dependencies point one way: ``nodes`` imports neither ``proxy`` nor ``dashboard``; ``dashboard``
  does not import ``proxy`` (nor ``proxy`` ``dashboard``); ``enginesim`` imports nothing of
  RouterPanel's and not Django; the product packages import neither ``enginesim`` nor ``tests``
  (neither is in the wheel). Every import counts here, wherever it stands, type-only ones too.
- ``proxy`` imports only the registry's public modules: ``nodes.choices``, ``nodes.rules``,
  ``nodes.live`` (and its submodules) anywhere, and ``nodes.models`` in ``proxy/snapshot.py`` only,
  where the snapshot is built off the hot path. Nothing else of ``nodes`` (services, selectors,
  admin, api, ...), and not the package ``nodes`` itself.
- No import cycle among the project's modules. Imports that run count, at module level or
  deferred inside a function; imports under ``if TYPE_CHECKING:`` never run and are left out. A
  module's implicit import of its parent packages is not counted (every package would otherwise
  sit in a cycle with the modules its ``__init__`` re-exports).
- No module in the product packages or the simulator is longer than ``MAX_LINES`` (about 400, with
  some slack), migrations aside.

The last tests run each check on a small made-up tree, to show that it does fail when broken.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("routerpanel", "nodes", "dashboard", "proxy")
PACKAGES = (*PRODUCT, "enginesim", "bench")
MAX_LINES = 420

# Package -> top-level modules it must never import.
FORBIDDEN = {
    "nodes": {"proxy", "dashboard", "enginesim", "tests"},
    "dashboard": {"proxy", "enginesim", "tests"},
    "proxy": {"dashboard", "enginesim", "tests"},
    "routerpanel": {"enginesim", "tests"},
    "enginesim": {"nodes", "proxy", "dashboard", "routerpanel", "django", "tests"},
}
# What ``proxy`` may import from ``nodes``: module -> the proxy modules allowed to (None: any).
PROXY_MAY_IMPORT: dict[str, set[str] | None] = {
    "nodes.choices": None,
    "nodes.rules": None,
    "nodes.live": None,
    "nodes.models": {"proxy.snapshot"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (the module a ``from`` import takes a name from)
    line: int
    type_only: bool  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}{' (type-only)' if self.type_only else ''}"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path, packages: Iterable[str]) -> list[Path]:
    return sorted(path for package in packages for path in (root / package).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, at any depth, and whether it is type-only (in the body of
    an ``if TYPE_CHECKING:``)."""
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, id(node) in type_only


def imports(root: Path, packages: Iterable[str]) -> list[Import]:
    """Every import in the packages' modules, resolved to the module it names.

    ``from package import name`` names ``package.name`` when that is a module of ours, else
    ``package`` (the name is then a function, class or constant of it).
    """
    files = source_files(root, packages)
    known = {module_name(path, root) for path in files}
    found: list[Import] = []
    for path in files:
        module = module_name(path, root)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, type_only in _import_statements(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names
                ]
            found += [Import(module, target, node.lineno, type_only) for target in dict.fromkeys(targets)]
    return found


def layer_violations(found: Iterable[Import]) -> list[str]:
    return [str(i) for i in found if i.target.split(".")[0] in FORBIDDEN.get(i.module.split(".")[0], set())]


def proxy_violations(found: Iterable[Import]) -> list[str]:
    bad = []
    for i in found:
        if i.module.split(".")[0] != "proxy" or i.target.split(".")[0] != "nodes":
            continue
        allowed = next(
            (who for name, who in PROXY_MAY_IMPORT.items() if i.target == name or i.target.startswith(name + ".")),
            set(),
        )
        if allowed is not None and i.module not in allowed:
            bad.append(str(i))
    return bad


def cycles(found: Iterable[Import], modules: set[str]) -> list[list[str]]:
    """The import cycles among ``modules`` (strongly connected components of more than one module,
    or a module importing itself), over the imports that run."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in found:
        if not i.type_only and i.target in modules:
            graph[i.module].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative so deep chains cannot overflow
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def long_modules(root: Path, packages: Iterable[str], limit: int = MAX_LINES) -> list[str]:
    return [
        f"{path.relative_to(root)}: {count} lines"
        for path in source_files(root, packages)
        if "migrations" not in path.parts and (count := len(path.read_text().splitlines())) > limit
    ]


# -- The checks on this repository -------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_imports() -> list[Import]:
    return imports(ROOT, PACKAGES)


def test_dependencies_point_one_way(project_imports: list[Import]) -> None:
    violations = layer_violations(project_imports)
    assert not violations, "imports against the dependency rule:\n" + "\n".join(violations)


def test_the_proxy_imports_only_the_registrys_public_modules(project_imports: list[Import]) -> None:
    violations = proxy_violations(project_imports)
    assert not violations, "proxy imports a part of nodes it must not:\n" + "\n".join(violations)


def test_no_import_cycle_among_the_projects_modules(project_imports: list[Import]) -> None:
    modules = {module_name(path, ROOT) for path in source_files(ROOT, PACKAGES)}
    found = cycles(project_imports, modules)
    assert not found, "import cycles (each among these modules):\n" + "\n".join(" ".join(c) for c in found)


def test_no_module_is_longer_than_about_400_lines() -> None:
    found = long_modules(ROOT, (*PRODUCT, "enginesim"))
    assert not found, f"modules over {MAX_LINES} lines (split them into a package):\n" + "\n".join(found)


# -- Each check fails when its rule is broken --------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_catch_an_import_against_the_rule(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "nodes/__init__.py": "",
            "nodes/services.py": "def later():\n    from proxy import app\n",
            "nodes/models.py": "",
            "nodes/choices.py": "",
            "proxy/__init__.py": "",
            "proxy/app.py": "from nodes import services\nfrom nodes.models import Node\n",
            "proxy/snapshot.py": "from nodes.models import Node\nfrom nodes import choices\n",
            "enginesim/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import django\n",
        },
    )
    found = imports(root, ("nodes", "proxy", "enginesim"))
    assert layer_violations(found) == [
        "enginesim:3 imports django (type-only)",
        "nodes.services:2 imports proxy.app",  # deferred to a function: it counts all the same
    ]
    assert proxy_violations(found) == ["proxy.app:1 imports nodes.services", "proxy.app:2 imports nodes.models"]


def test_the_cycle_check_finds_a_cycle_and_leaves_type_only_imports_out(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import f\n",
            "pkg/a.py": "from . import b\ndef f():\n    pass\n",
            "pkg/b.py": "def g():\n    from pkg.c import h\n",
            "pkg/c.py": "from pkg import a\n",
            "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import x\n",
            "pkg/e.py": "from pkg import d\n",
        },
    )
    found = imports(root, ("pkg",))
    modules = {module_name(path, root) for path in source_files(root, ("pkg",))}
    assert cycles(found, modules) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_size_check_finds_a_long_module_but_not_a_migration(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {"nodes/long.py": "x = 1\n" * 421, "nodes/migrations/0001_initial.py": "x = 1\n" * 900, "nodes/ok.py": "\n"},
    )
    assert long_modules(root, ("nodes",)) == ["nodes/long.py: 421 lines"]


def test_a_web_worker_does_not_load_the_rest_apis_serializers_at_start() -> None:
    """A web worker that serves only ``/v1`` never needs DRF's fields and drf-spectacular's helpers
    (with their optional imports: psycopg, requests, pygments, django.test), about 20 MB of its
    memory; the dashboard imports them when a page or the live tail first asks for them."""
    import subprocess
    import sys

    heavy = ("rest_framework.fields", "drf_spectacular.utils", "django.test")
    script = f"import sys, routerpanel.asgi; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    ).stdout.split()
    assert loaded == []
