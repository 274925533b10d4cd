"""Arrows run one way (the project's design notes; issue 19 item 1).

faces (CLI, doctor, web page) -> linkusd -> flow -> verifiers | state | mail -> config
-> sources (``nss_config``, which imports nothing above it). Every import counts: at
module top, inside a function, under ``if TYPE_CHECKING:`` -- a type-only arrow up
is still a dependency up, and the first step of the next circle.

``python3 tests/test_layers.py [ROOT]`` prints the graph's cycles and upward arrows.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Bottom first. A name is a module, or a package with everything under it. A module
#: may import from its own layer or any layer below, never from a layer above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("sources", ("nss_config",)),
    # tiny shared modules that import nothing of pam_linkus's above them
    ("base", ("pam_linkus", "pam_linkus.errors", "pam_linkus.outcome", "pam_linkus.mailtext",
              "pam_linkus.pamconf", "pam_linkus.logline", "pam_linkus.nodump", "pam_linkus.groups")),
    ("config", ("pam_linkus.config",)),
    ("verifiers | state | mail", ("pam_linkus.codes", "pam_linkus.totp", "pam_linkus.recovery",
                                  "pam_linkus.emailcode", "pam_linkus.password", "pam_linkus.state",
                                  "pam_linkus.mail", "pam_linkus.notify")),
    ("flow", ("pam_linkus.flow", "pam_linkus.policy", "pam_linkus.enrollment")),
    ("linkusd", ("pam_linkus.daemon", "pam_linkus.protocol")),
    ("faces", ("pam_linkus.cli", "pam_linkus.doctor", "pam_linkus.migrate_pam", "pam_linkus.gauth",
               "pam_linkus.web")),
]
PACKAGES = ("pam_linkus", "nss_config")


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of our packages under ``root``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported_names(name: str, path: Path, tree: ast.AST | None = None) -> Iterator[str]:
    """Every dotted name ``path`` (or ``tree``, a part of it) imports, wherever the statement stands."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree or ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                yield f"{base}.{alias.name}"


def edges(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (nearest enclosing module of each name)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in _imported_names(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific name that covers ``module``; None if none does."""
    best: tuple[int, int] | None = None  # (length of the matching name, layer)
    for index, (_title, names) in enumerate(LAYERS):
        for entry in names:
            exact_only = entry == "pam_linkus"  # the package itself; its modules are listed one by one
            if module == entry or (not exact_only and module.startswith(entry + ".")):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    return None if best is None else best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b (layer -> higher layer)`` for every import of a module from a layer above its own."""
    arrows = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            low, high = layer_of(source), layer_of(target)
            if low is not None and high is not None and high > low:
                arrows.append(f"{source} -> {target} ({LAYERS[low][0]} -> {LAYERS[high][0]})")
    return arrows


#: What may still be imported inside a function (issue 19 item 5): optional dependencies
#: a host may lack, and our modules that import one at their top. Everything else stands
#: at the top of its module: linkusd is long-running, so import time buys nothing, and an
#: import inside a function hides a dependency until the one call that needs it fails.
OPTIONAL_IMPORTS = (
    "ldap3",  # only with an LDAP source
    "nss_config.ldap_source",
    "nss_config.ldap_writer",
    "redis",  # only with Redis state
    "pam_linkus.state.redis_store",
    "segno",  # QR codes
    "prometheus_client",  # only with metrics.listen set (python3-prometheus-client is a Recommends)
    "pam_linkus.daemon.exposition",
)


def imports_in_functions(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import statement inside a function of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    seen: set[int] = set()
    for function in functions:
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in seen:
                seen.add(id(node))
                yield from ((node.lineno, target) for target in _imported_names(name, path, node))


def misplaced_imports(root: Path) -> list[str]:
    """``module:line name`` for each import inside a function that is not an optional dependency."""
    found = []
    for name, path in sorted(modules(root).items()):
        for line, target in imports_in_functions(name, path):
            if not any(target == allowed or target.startswith(allowed + ".") for allowed in OPTIONAL_IMPORTS):
                found.append(f"{name}:{line} {target}")
    return found


def local_type_checking_flags(root: Path) -> list[str]:
    """Modules that define their own ``TYPE_CHECKING = False`` instead of importing typing's."""
    found = []
    for name, path in sorted(modules(root).items()):
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Name) and target.id == "TYPE_CHECKING" for target in node.targets):
                found.append(f"{name}:{node.lineno}")
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules(ROOT) if layer_of(m) is None]
    assert unplaced == [], "add these to LAYERS in tests/test_layers.py"


def test_no_import_cycle() -> None:
    assert cycles(edges(ROOT)) == []


def test_no_arrow_runs_up() -> None:
    assert upward(edges(ROOT)) == []


def test_the_sources_import_nothing_of_pam_linkus() -> None:
    graph = edges(ROOT)
    assert [(a, b) for a in graph if a.startswith("nss_config") for b in graph[a] if b.startswith("pam_linkus")] == []


def test_nothing_outside_the_page_imports_web() -> None:
    """``pam_linkus.web`` is what runs as the linkus-web user; linkusd's side of its calls
    (daemon.selfservice), the password check and doctor's web checks live elsewhere."""
    graph = edges(ROOT)
    assert [(a, b) for a in graph if not a.startswith("pam_linkus.web")
            for b in graph[a] if b.startswith("pam_linkus.web")] == []


def test_the_errors_declared_below_are_the_tree_s_own() -> None:
    import nss_config.errors
    import pam_linkus.errors
    from pam_linkus.outcome import Outcome

    assert nss_config.errors.UNAVAILABLE == Outcome.UNAVAILABLE
    for name in ("LinkusError", "Unavailable", "ConfigError", "SourceUnavailable"):
        assert getattr(pam_linkus.errors, name) is getattr(nss_config.errors, name)
    assert issubclass(pam_linkus.errors.StateUnavailable, nss_config.errors.Unavailable)


def test_the_checker_sees_imports_in_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    """The checks above could pass by seeing nothing: a small tree with one arrow up of each kind."""
    (tmp_path / "nss_config").mkdir()
    (tmp_path / "pam_linkus").mkdir()
    (tmp_path / "nss_config" / "__init__.py").write_text("")
    (tmp_path / "pam_linkus" / "__init__.py").write_text("")
    (tmp_path / "nss_config" / "base.py").write_text(
        "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from pam_linkus.config import Config\n")
    (tmp_path / "nss_config" / "chain.py").write_text("def f():\n    from pam_linkus import flow\n")
    (tmp_path / "pam_linkus" / "config.py").write_text("from nss_config import chain\n")
    (tmp_path / "pam_linkus" / "flow.py").write_text("from .config import x\n")
    graph = edges(tmp_path)
    assert graph["nss_config.base"] == {"pam_linkus.config"}
    assert graph["nss_config.chain"] == {"pam_linkus.flow"}
    assert graph["pam_linkus.config"] == {"nss_config.chain"}
    assert graph["pam_linkus.flow"] == {"pam_linkus.config"}
    assert cycles(graph) == [["nss_config.chain", "pam_linkus.config", "pam_linkus.flow"]]
    assert upward(graph) == ["nss_config.base -> pam_linkus.config (sources -> config)",
                             "nss_config.chain -> pam_linkus.flow (sources -> flow)"]



def test_imports_stand_at_the_top_but_optional_dependencies() -> None:
    assert misplaced_imports(ROOT) == []


def test_no_module_fakes_typing_s_type_checking_flag() -> None:
    """A pam_python-era trick (``typing`` cost milliseconds per login); typing's own flag is the one."""
    assert local_type_checking_flags(ROOT) == []


def test_the_import_checks_see_what_they_refuse(tmp_path: Path) -> None:
    """The two checks above could pass by seeing nothing: a tree with one of each."""
    (tmp_path / "nss_config").mkdir()
    (tmp_path / "pam_linkus").mkdir()
    (tmp_path / "nss_config" / "__init__.py").write_text("")
    (tmp_path / "pam_linkus" / "__init__.py").write_text("")
    (tmp_path / "nss_config" / "base.py").write_text("TYPE_CHECKING = False\n")
    (tmp_path / "nss_config" / "chain.py").write_text(
        "def f():\n    from nss_config.ldap_source import LdapSource\n\n"
        "def g():\n    if True:\n        from . import base\n\n"
        "class C:\n    async def h(self):\n        import ldap3.core\n        import os\n")
    (tmp_path / "pam_linkus" / "daemon").mkdir()
    (tmp_path / "pam_linkus" / "daemon" / "__init__.py").write_text("def f():\n    import json\n")
    assert misplaced_imports(tmp_path) == ["nss_config.chain:6 nss_config.base", "nss_config.chain:11 os",
                                           "pam_linkus.daemon:2 json"]
    assert local_type_checking_flags(tmp_path) == ["nss_config.base:1"]


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    graph = edges(where)
    print("modules", len(graph), "edges", sum(len(targets) for targets in graph.values()))
    for component in cycles(graph):
        print("cycle", len(component), component)
    for arrow in upward(graph):
        print("up", arrow)
    for module in sorted(m for m in graph if layer_of(m) is None):
        print("no layer", module)
