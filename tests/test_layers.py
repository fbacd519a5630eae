"""The layers of DESIGN.md, enforced on the source: who may import whom, and no import circle.

Every project module is parsed with `ast` (imports inside functions included, relative imports resolved, and
`importlib.import_module` with a literal name or an f-string prefix), and each import of another project module
is checked against `ALLOWED`. The library never imports an app; `unime/cli.py`, the command table, is the one
exception and imports the apps inside its functions only. Imports under `if TYPE_CHECKING:` never run: they count
for the directions, not for circles.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs(pyproject: Path) -> dict[str, str]:
    """Import name -> folder, from pyproject.toml's [tool.setuptools.package-dir] (the apps mapped into `unime`)."""
    section = pyproject.read_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([\w./-]+)"', section, re.MULTILINE))


PACKAGE_DIRS = _package_dirs(ROOT / "pyproject.toml")

SCRIPT_FOLDERS = ("recipes", "bench")
"""Folders of scripts (not installed): each is an app of its own, its modules named `<folder>.<file>`."""

APPS = {name: name.rpartition(".")[2] for name in PACKAGE_DIRS if name != "unime"} | {f: f for f in SCRIPT_FOLDERS}
"""Module prefix -> app (`unime.eval` -> `eval`). Any other `unime.*` module is the library."""

COMMAND_TABLE = "unime.cli"

ALLOWED = {
    "library": set(),
    "data_synth": {"library"},
    "serve": {"library"},
    "eval": {"library", "data_synth"},  # the synthetic benchmark is drawn from data_synth's scenes
    "quickstart": {"library", "data_synth", "eval", "serve"},
    "recipes": {"library", "data_synth", "eval", "serve"},
    "bench": {"library", "data_synth", "eval", "serve"},
    "cli": {"library", "data_synth", "eval", "serve", "quickstart"},  # apps inside its functions only
}
"""Layer -> the other layers it may import (a layer always imports itself). No app imports quickstart, recipes
or bench: they are the top."""


@dataclass(frozen=True)
class Import:
    source: str
    """The importing module."""
    target: str
    """The imported project module."""
    file: str
    """The importing file, relative to the repository root."""
    line: int
    local: bool
    """Inside a function (runs when called)."""
    type_only: bool
    """Under `if TYPE_CHECKING:` (never runs)."""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def project_modules(root: Path) -> dict[str, Path]:
    """Every project module by its import name."""
    modules = {}
    for name, folder in [*PACKAGE_DIRS.items(), *((folder, folder) for folder in SCRIPT_FOLDERS)]:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name, *parts])] = path
    return modules


def layer(module: str) -> str:
    if module == COMMAND_TABLE:
        return "cli"
    for prefix, app in APPS.items():
        if module == prefix or module.startswith(prefix + "."):
            return app
    return "library"


class _ImportScanner:
    """The project imports of one module. Only statement lists are walked (an import is a statement), and
    expressions only in a module that calls `import_module`: walking every node would take seconds."""

    def __init__(self, module: str, path: Path, root: Path, modules: dict[str, Path]):
        self.module, self.modules = module, modules
        self.file = str(path.relative_to(root))
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.imports: list[Import] = []
        text = path.read_text()
        self._dynamic = "import_module" in text
        self._statements(ast.parse(text, filename=str(path)).body, local=False, type_only=False)

    def _statements(self, body: list[ast.stmt], *, local: bool, type_only: bool) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    self._add(alias.name, stmt, local, type_only)
            elif isinstance(stmt, ast.ImportFrom):
                self._import_from(stmt, local, type_only)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._statements(stmt.body, local=True, type_only=type_only)
            elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
                self._statements(stmt.body, local=local, type_only=True)
                self._statements(stmt.orelse, local=local, type_only=type_only)
            else:
                self._compound(stmt, local, type_only)

    def _compound(self, stmt: ast.stmt, local: bool, type_only: bool) -> None:
        """The statement lists inside `stmt` (class, if, for, while, with, try, match), and its expressions."""
        for _, value in ast.iter_fields(stmt):
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.stmt):
                    self._statements([child], local=local, type_only=type_only)
                elif isinstance(child, (ast.excepthandler, ast.match_case)):
                    self._statements(child.body, local=local, type_only=type_only)
                elif isinstance(child, ast.AST) and self._dynamic:
                    for node in ast.walk(child):
                        if isinstance(node, ast.Call):
                            self._import_module_call(node, local, type_only)

    def _import_from(self, node: ast.ImportFrom, local: bool, type_only: bool) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        for alias in node.names:
            # `from pkg import submodule` imports that submodule; `from module import name` the module.
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else base, node, local, type_only)

    def _import_module_call(self, node: ast.Call, local: bool, type_only: bool) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name != "import_module" or not node.args:
            return
        argument = node.args[0]
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
            self._add(argument.value, node, local, type_only)
        elif isinstance(argument, ast.JoinedStr) and argument.values:
            # f"pkg.{name}": any module of that package.
            first = argument.values[0]
            if isinstance(first, ast.Constant) and str(first.value).endswith("."):
                prefix = str(first.value)
                for module in self.modules:
                    if module.startswith(prefix) and "." not in module[len(prefix) :]:
                        self._add(module, node, local, type_only)

    def _add(self, name: str, node: ast.stmt | ast.expr, local: bool, type_only: bool) -> None:
        target = self._project_module(name)
        if target is not None and target != self.module:
            self.imports.append(Import(self.module, target, self.file, node.lineno, local, type_only))

    def _project_module(self, name: str) -> str | None:
        """The longest project module that `name` names (`unime.serve.app.create_app` -> `unime.serve.app`)."""
        parts = name.split(".")
        while parts:
            if ".".join(parts) in self.modules:
                return ".".join(parts)
            parts.pop()
        return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@functools.cache
def project_imports(root: Path) -> tuple[Import, ...]:
    """Every import of a project module by another (parsed once per root)."""
    modules = project_modules(root)
    imports = []
    for module, path in modules.items():
        imports += dict.fromkeys(_ImportScanner(module, path, root, modules).imports)  # `from m import a, b`: one
    return tuple(imports)


def direction_violations(imports: tuple[Import, ...]) -> list[str]:
    found = []
    for imp in imports:
        source, target = layer(imp.source), layer(imp.target)
        if source == target:
            continue
        if target not in ALLOWED[source]:
            found.append(f"{imp.where()}: {imp.source} ({source}) imports {imp.target} ({target})")
        elif source == "cli" and target != "library" and not imp.local:
            found.append(f"{imp.where()}: the command table imports the app {imp.target} at module level")
    return sorted(found)


def import_circles(imports: tuple[Import, ...]) -> list[str]:
    """Each circle of runtime imports between modules, as its chain of imports (file:line each)."""
    edges: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in imports:
        lazy_app_import = layer(imp.source) == "cli" and imp.local and layer(imp.target) != "library"
        if not imp.type_only and not lazy_app_import:
            edges[imp.source].setdefault(imp.target, imp)
    return [_describe(circle, edges) for circle in _strongly_connected(edges) if len(circle) > 1]


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit on a deep chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _describe(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """One circle through the component's first module: the shortest way back to it, import by import."""
    members = set(component)
    start = component[0]
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in came_from:
        following = []
        for node in frontier:
            for target, imp in sorted(edges[node].items()):
                if target in members and target not in came_from:
                    came_from[target] = imp
                    following.append(target)
        frontier = following
    chain, node = [], start
    while True:
        chain.append(came_from[node])
        node = came_from[node].source
        if node == start:
            break
    steps = "; ".join(f"{imp.where()} imports {imp.target}" for imp in reversed(chain))
    return f"circle of {len(component)} modules ({', '.join(component)}): {steps}"


# --------------------------------------------------------------------------------------------------------
# The project
# --------------------------------------------------------------------------------------------------------
def test_every_package_folder_is_a_layer_with_its_directions() -> None:
    assert {"unime.eval", "unime.serve", "unime.data_synth", "unime.quickstart"} <= set(PACKAGE_DIRS)
    mapped = {*PACKAGE_DIRS.values(), *SCRIPT_FOLDERS}
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages <= mapped, f"folders of modules that no layer names: {sorted(packages - mapped)}"
    assert set(ALLOWED) == {"library", "cli", *APPS.values()}, "each app needs its line in ALLOWED"
    # The quickstart is an app beside eval/ and serve/, not a package inside the library folder.
    assert not (ROOT / "unime" / "quickstart").exists()


def test_no_import_goes_against_the_allowed_directions() -> None:
    imports = project_imports(ROOT)
    assert len(imports) > 300  # the scan found the project
    violations = direction_violations(imports)
    assert not violations, "imports against the layers (DESIGN.md):\n" + "\n".join(violations)


def test_no_module_imports_another_that_imports_it_back() -> None:
    circles = import_circles(project_imports(ROOT))
    assert not circles, "import circles:\n" + "\n".join(circles)


# --------------------------------------------------------------------------------------------------------
# The checks themselves, on a small tree with the faults they must find
# --------------------------------------------------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in [*PACKAGE_DIRS.values(), *SCRIPT_FOLDERS]:
        (root / folder).mkdir(exist_ok=True)
    return root


def test_a_library_import_of_an_app_inside_a_function_is_named_with_file_and_line(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "unime/__init__.py": "",
            "unime/tool.py": """\
                import os


                def helper():
                    from unime.serve.app import create_app
                    return create_app
            """,
            "unime/cli.py": "from unime.eval import runner\n",
            "serve/__init__.py": "",
            "serve/app.py": "from .. import tool\nfrom unime.quickstart import run\n",
            "eval/__init__.py": "",
            "eval/runner.py": "",
            "quickstart/__init__.py": "",
        },
    )
    violations = direction_violations(project_imports(root))
    assert violations == [
        "serve/app.py:2: unime.serve.app (serve) imports unime.quickstart (quickstart)",
        "unime/cli.py:1: the command table imports the app unime.eval.runner at module level",
        "unime/tool.py:5: unime.tool (library) imports unime.serve.app (serve)",
    ]


def test_a_circle_is_named_import_by_import_and_type_only_imports_are_not_one(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "unime/__init__.py": "from unime.a import f\n",
            "unime/a.py": "def f():\n    from unime import b\n",
            "unime/b.py": "import importlib\nimportlib.import_module('unime.c')\n",
            "unime/c.py": "from .a import f\n",
            "unime/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from unime.e import E\n",
            "unime/e.py": "from unime.d import D\n",
        },
    )
    assert import_circles(project_imports(root)) == [
        "circle of 3 modules (unime.a, unime.b, unime.c): "
        "unime/a.py:2 imports unime.b; unime/b.py:2 imports unime.c; unime/c.py:1 imports unime.a"
    ]
