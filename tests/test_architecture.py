"""The architecture contract, checked on the source (nothing of the product is run).

- import-linter's contracts in pyproject.toml: the layers of `patchcore_jax._src` point one way
  (app -> api -> io -> run -> model -> stages), the implementation never imports the public face,
  only diagnostics imports the oracle, and the oracle never imports JAX;
- no import cycle anywhere in the product, inside a layer too (grimp reads every import statement,
  those inside functions included, so imports made at run time count as well);
- no module reaches for another module's private names, or reads another object's private members;
- nothing below the command line prints or draws progress bars (it reports through callbacks);
- no module is longer than 400 lines.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRODUCT = ROOT / "patchcore_jax"
MAX_LINES = 400
# The command line (its parser, its commands and their console) is the one place that prints
# (STYLE.md: the layers below report through callbacks).
PRINTERS = {"patchcore_jax/_src/app/cli.py", "patchcore_jax/_src/app/commands.py", "patchcore_jax/_src/app/console.py"}


def product_files() -> list[pathlib.Path]:
    return sorted(PRODUCT.rglob("*.py"))


def rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_linter_contracts_are_kept():
    pytest.importorskip("importlinter")
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
                        "sys.exit(c())"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" not in r.stdout.lower().split("contracts:")[-1].split("\n")[0].replace("0 broken", "")


def _import_graph() -> dict[str, set[str]]:
    """module -> the product modules it imports (anywhere in its code, at any depth)."""
    modules = {module_name(p): p for p in product_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` depends on pkg.mod (and runs pkg's __init__, which is its face)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                raise AssertionError(f"{rel(path)}:{node.lineno}: a dynamic import hides an arrow from this check")
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    # A package's __init__ importing its own submodules is its face, not a cycle of the code.
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    assert _cycles(graph) == []


def _private_uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    imported = set()  # local names bound to modules of this package or of JAX
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{rel(path)}:{node.lineno}: imports {node.module}.{a.name}")
                if (node.module or "").startswith(("patchcore_jax", "jax", "reference")):
                    imported.add(a.asname or a.name)
            if (node.module or "").split(".")[0] in ("jax", "jaxlib") and "._src" in f".{node.module}":
                found.append(f"{rel(path)}:{node.lineno}: imports JAX's private {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                imported.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            found.append(f"{rel(path)}:{node.lineno}: reads {ast.unparse(node)}")
    return found


def test_no_private_names_cross_a_module_boundary():
    found = [use for p in product_files() for use in _private_uses(p)]
    assert found == []


def test_nothing_below_the_command_line_prints():
    found = []
    for p in product_files():
        if rel(p) in PRINTERS:
            continue
        tree = ast.parse(p.read_text(), filename=str(p))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{rel(p)}:{node.lineno}: print")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] == "tqdm" for n in names):
                    found.append(f"{rel(p)}:{node.lineno}: imports tqdm")
            if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{rel(p)}:{node.lineno}: sys.{node.attr}")
    assert found == []


def test_no_module_is_over_400_lines():
    long = {rel(p): n for p in product_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_find_what_they_look_for(tmp_path):
    """The detectors themselves: a cycle, a private import, a private read and a print are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    src = tmp_path / "m.py"
    src.write_text("from patchcore_jax.x import _hidden\nimport os\nmodel._extract\nself._ok\nos._exit\n")
    uses = _private_uses(src.resolve()) if False else None  # rel() needs a path under ROOT
    bad = PRODUCT / "_probe_for_architecture_test.py"
    bad.write_text(src.read_text())
    try:
        uses = _private_uses(bad)
    finally:
        bad.unlink()
    assert len(uses) == 3 and "_hidden" in uses[0] and "model._extract" in uses[1] and "os._exit" in uses[2]
