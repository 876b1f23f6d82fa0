"""The package's import graph follows ARCHITECTURE.md: no upward import, no cycle, every module placed."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "free_kernels"


def read_layers(text: str) -> dict:
    """{prefix: (level, layer name)} from the ```layers block of ARCHITECTURE.md."""
    m = re.search(r"```layers\n(.*?)```", text, re.S)
    if m is None:
        raise AssertionError("ARCHITECTURE.md has no ```layers block")
    layers = {}
    for line in m.group(1).strip().splitlines():
        head, _, prefixes = line.partition(":")
        level, name = head.split()
        for p in prefixes.split():
            if p in layers:
                raise AssertionError(f"prefix {p!r} is placed twice in ARCHITECTURE.md")
            layers[p] = (int(level), name)
    return layers


def modules(pkg: pathlib.Path) -> dict:
    """{dotted name relative to the package ('' for the package itself): path}."""
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(pkg).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: pathlib.Path, known: set) -> set:
    """Package-relative names of the modules ``name`` imports (statements anywhere in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if name else []
    pkg_parts = here if is_pkg else here[:-1]
    found = set()

    def add(dotted: str):
        # the longest known module the dotted name starts with (a from-import may name an attribute)
        parts = dotted.split(".") if dotted else []
        while parts and ".".join(parts) not in known:
            parts.pop()
        found.add(".".join(parts))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "free_kernels" or a.name.startswith("free_kernels."):
                    add(a.name[len("free_kernels."):] if "." in a.name else "")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "free_kernels" or (node.module or "").startswith("free_kernels."):
                mod = node.module[len("free_kernels."):] if "." in node.module else ""
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                add(sub if sub in known or a.name == "_C" else mod)
    found.discard(name)
    return found


def level_of(name: str, layers: dict):
    key = name or "__init__"
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        hit = layers.get(".".join(parts[:i]))
        if hit is not None:
            return hit
    return None


def graph():
    mods = modules(PKG)
    known = set(mods) | {"_C"}
    return mods, {n: imports(n, p, known) for n, p in mods.items()}


def find_cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


LAYERS = read_layers((ROOT / "ARCHITECTURE.md").read_text())


def test_every_module_is_placed():
    mods, _ = graph()
    unplaced = sorted(n or "__init__" for n in mods if level_of(n, LAYERS) is None)
    assert not unplaced, f"modules ARCHITECTURE.md does not place: {unplaced}"


def test_no_import_points_up():
    _, edges = graph()
    bad = []
    for src, dsts in sorted(edges.items()):
        ls = level_of(src, LAYERS)
        for dst in sorted(dsts):
            ld = level_of(dst, LAYERS)
            if ls is not None and ld is not None and ld[0] > ls[0]:
                bad.append(f"{src or '__init__'} ({ls[1]}) -> {dst or '__init__'} ({ld[1]})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    _, edges = graph()
    # a package's __init__ is imported by each of its modules implicitly, not by an import statement;
    # the edges here are the statements, so a cycle is a real one
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# ---------------------------------------------------------------- the checker itself
def _write(tmp: pathlib.Path, files: dict) -> None:
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_sees_upward_lazy_imports_and_cycles(tmp_path):
    pkg = tmp_path / "free_kernels"
    _write(pkg, {
        "__init__.py": "",
        "ops/__init__.py": "",
        "ops/a.py": "def f():\n    from ..models import n\n",  # upward, inside a function
        "ops/b.py": "",
        "models/__init__.py": "",
        "models/m.py": "from ..ops import b\nfrom . import n\n",
        "models/n.py": "import free_kernels.models.m\n",  # cycle m <-> n within a layer
    })
    mods = modules(pkg)
    known = set(mods)
    edges = {n: imports(n, p, known) for n, p in mods.items()}
    assert edges["ops.a"] == {"models.n"}
    assert edges["models.m"] == {"ops.b", "models.n"}
    layers = read_layers("```layers\n3 ops: ops\n5 models: models\n8 top: __init__\n```")
    assert level_of("ops.a", layers)[0] < level_of("models.m", layers)[0]
    assert find_cycles(edges) == [["models.m", "models.n"]]
    up = [(s, d) for s, ds in edges.items() for d in ds
          if level_of(s, layers) and level_of(d, layers) and level_of(d, layers)[0] > level_of(s, layers)[0]]
    assert up == [("ops.a", "models.n")]


def test_layout_section_of_readme_names_existing_paths():
    """Every file or folder name in the README's layout block exists somewhere in the tree."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S)
    assert m, "README.md has no Layout block"
    skip = {"build", ".git", "runs", "__pycache__"}
    paths = set()
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if skip.isdisjoint(rel.parts) and not rel.parts[0].endswith(".egg-info"):
            paths.add(rel.as_posix() + ("/" if p.is_dir() else ""))
    missing = []
    for token in re.findall(r"[\w.-]+(?:/[\w.-]*)*(?:/|\.py|\.md|\.cu|\.h)(?![\w])", m.group(1)):
        if not any(("/" + q).endswith("/" + token) for q in paths):
            missing.append(token)
    assert not missing, f"README layout names paths that do not exist: {missing}"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
