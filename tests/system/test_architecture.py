"""The package's shape: no import cycle, few lazy imports (each for an optional heavy dependency, with
its reason), no module over 450 lines, nothing that points outside the repository.

The import graph counts every ``import`` statement of every module of ``advalign_jax``, at module level
and inside functions: ``from a.b import c`` is an edge to ``a.b.c`` where that is a module, else to
``a.b``; importing a module does not count as importing its parent package.
"""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "advalign_jax")
MAX_LINES = 450
MAX_LAZY = 20
# What a lazy import may be for: optional or heavy dependencies whose import time matters, or that must
# be imported under conditions (TensorFlow with accelerators hidden).
LAZY_ALLOWED = ("torch", "tensorflow", "tensorflow_datasets", "keras", "matplotlib", "safetensors", "sklearn",
                "tensorboard")


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = path
    return out


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if not level:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - level + 1]
    return ".".join(base + ([module] if module else []))


def import_edges() -> dict:
    """{module: {(imported module, lineno, lazy)}} for imports of the package's own modules."""
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        found = set()
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            lazy = id(node) not in top_level and not _under_top_level_guard(tree, node)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("advalign_jax"):
                        found.add((alias.name, node.lineno, lazy))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node.module or "", node.level, name, is_package)
                if not target.startswith("advalign_jax"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add((sub if sub in modules else target, node.lineno, lazy))
        edges[name] = found
    return edges


def _under_top_level_guard(tree, node) -> bool:
    """An import inside a module-level ``try``/``if`` block runs at import time: not lazy."""
    for top in tree.body:
        if isinstance(top, (ast.Try, ast.If)) and any(n is node for n in ast.walk(top)):
            return not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and
                           any(m is node for m in ast.walk(n)) for n in ast.walk(top))
    return False


def cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (or a module importing itself)."""
    graph = {m: {t for t, _, _ in es if t in edges and t != m} for m, es in edges.items()}
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


def lazy_imports() -> list:
    """(path, line, imported name, the line's text) of every import inside a function or class body."""
    out = []
    for name, path in _modules().items():
        with open(path) as f:
            text = f.read()
        tree = ast.parse(text, path)
        lines = text.splitlines()
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level \
                    and not _under_top_level_guard(tree, node):
                what = node.names[0].name if isinstance(node, ast.Import) else (node.module or "")
                out.append((os.path.relpath(path, REPO), node.lineno, what, lines[node.lineno - 1]))
    return out


def test_no_import_cycle():
    found = cycles(import_edges())
    assert not found, f"import cycles among the package's modules: {found}"


def test_lazy_imports_are_few_and_each_has_a_reason():
    lazy = lazy_imports()
    own = [item for item in lazy if item[2].startswith("advalign_jax") or item[2] == ""]
    assert not own, f"the package's own modules are imported at the top, not inside functions: {own}"
    assert len(lazy) <= MAX_LAZY, f"{len(lazy)} lazy imports (at most {MAX_LAZY}): {lazy}"
    for path, line, what, text in lazy:
        assert what.split(".")[0] in LAZY_ALLOWED, f"{path}:{line}: a lazy import of {what} (not an optional " \
                                                   "heavy dependency): import it at the top"
        assert re.search(r"#\s*\S", text), f"{path}:{line}: a lazy import needs its reason on the line"


def test_no_module_is_over_the_line_limit():
    long = []
    for name, path in _modules().items():
        with open(path) as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append((os.path.relpath(path, REPO), n))
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_nothing_points_outside_the_repository():
    hits = []
    for root, dirs, files in os.walk(REPO):
        top = root == REPO  # the repository's own results/ and data/ folders hold outputs, not sources
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "build", "dist")
                   and not d.endswith(".egg-info") and not (top and d in ("results", "data"))]
        for name in files:
            if not name.endswith((".py", ".md", ".ipynb", ".sh", ".txt", ".cfg", ".ini", ".toml", ".json")) \
                    and name != "Makefile" and name != "run":
                continue
            path = os.path.join(root, name)
            try:
                with open(path, errors="replace") as f:
                    for i, line in enumerate(f, 1):
                        if "../" + "shared" in line:
                            hits.append(f"{os.path.relpath(path, REPO)}:{i}")
            except OSError:
                continue
    assert not hits, f"files that point to a folder users do not have: {hits}"
