"""The package's own imports, read from its source with `ast` (nothing is imported): every `.py` under
weightpack/, imports inside functions and under `if TYPE_CHECKING:` included, relative and absolute.

Two rules:
- no import cycles inside the package. The graph has an edge from a module to each package module an import
  statement names (`from .a import f`: a; `from . import a` or `from .p import a` where a is a submodule: that
  submodule; `import weightpack.a`: a). The parent packages that Python initializes on the way are not
  edges. A cycle is reported as its strongly connected component (the modules that all reach each other),
  with one cycle through them spelled out.
- no use of another package module's underscore name: `from .a import _f`, `a._f` where `a` names a package
  module, `getattr(a, "_f")`, and `C._m` where `C` is a class imported from another module or a name that
  holds one of its instances (a name assigned `C(...)`, bound by `with C(...) as name`, or annotated with
  `C`); on any other receiver (`x._m`, `self.reader._m`), `_m` counts as another module's when classes there
  define it and none here does (`self`, `cls` and names imported from outside the package are left alone).
  Dunder names (`__version__`) are public; a module's own names, and package modules whose names start with
  an underscore (`_interrupt`, `_native`), are fine.

KNOWN lists the cases let stand, each with a comment saying why. It is empty: the cycles and underscore
names there were when this test was written were removed in issue 11. The test also fails on a KNOWN entry
that no longer occurs.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "weightpack"

KNOWN: set[str] = set()


# -- reading the package ---------------------------------------------------------------------------------

def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not _is_dunder(name)


class Package:
    """The modules of the package rooted at `root` (a folder with __init__.py): dotted names, trees, classes."""

    def __init__(self, root: Path):
        self.name = root.name
        self.trees: dict[str, ast.Module] = {}
        self.is_pkg: dict[str, bool] = {}
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            pkg = parts[-1] == "__init__"
            if pkg:
                parts.pop()
            mod = ".".join(parts)
            self.trees[mod] = ast.parse(path.read_text(encoding="utf-8"), str(path))
            self.is_pkg[mod] = pkg
        self.classes = {m: {n.name for n in t.body if isinstance(n, ast.ClassDef)} for m, t in self.trees.items()}
        self.members = {m: {n.name: _members(n) for n in t.body if isinstance(n, ast.ClassDef)}
                        for m, t in self.trees.items()}

    def short(self, mod: str) -> str:
        return mod[len(self.name) + 1:] if mod.startswith(self.name + ".") else mod

    def base_of(self, mod: str, node: ast.ImportFrom) -> str | None:
        """The module an ImportFrom names (resolved if relative), or None if it is outside the package."""
        if node.level == 0:
            target = node.module or ""
        else:
            base = mod if self.is_pkg[mod] else mod.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
        return target if target in self.trees else None


def _members(cls: ast.ClassDef) -> set[str]:
    """The names a class defines: in its body, and as `self.name = ...` in its methods."""
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


def _annotation_names(ann: ast.AST | None) -> list[ast.AST]:
    """The Name and Attribute nodes of an annotation, string annotations parsed."""
    if ann is None:
        return []
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        try:
            ann = ast.parse(ann.value, mode="eval").body
        except SyntaxError:
            return []
    return [n for n in ast.walk(ann) if isinstance(n, (ast.Name, ast.Attribute))]


class ModuleReader:
    """One module's edges (package modules it imports) and uses of other modules' underscore names."""

    def __init__(self, pkg: Package, mod: str):
        self.pkg, self.mod = pkg, mod
        self.edges: set[str] = set()
        self.private: set[str] = set()
        self.modules: dict[str, str] = {}  # local name -> package module it is bound to
        self.class_names: dict[str, tuple[str, str]] = {}  # local name -> (module, class) imported
        self.external: set[str] = set()  # local names bound by imports from outside the package
        tree = pkg.trees[mod]
        for node in ast.walk(tree):  # bindings first, anywhere in the file: a lazy import binds as well
            if isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node)
        self._scope(tree.body, [], {})

    def _use(self, owner: str, name: str, member: str | None = None) -> None:
        if owner != self.mod:
            what = f"{self.pkg.short(owner)}.{name}" + (f".{member}" if member else "")
            self.private.add(f"private: {self.pkg.short(self.mod)} -> {what}")

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name not in self.pkg.trees:
                self.external.add(alias.asname or alias.name.partition(".")[0])
            else:
                self.edges.add(alias.name)
                bound = alias.name if alias.asname else alias.name.partition(".")[0]
                self.modules[alias.asname or bound] = bound

    def _import_from(self, node: ast.ImportFrom) -> None:
        base = self.pkg.base_of(self.mod, node)
        if base is None:
            self.external.update(a.asname or a.name for a in node.names)
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.pkg.trees:
                self.edges.add(sub)
                self.modules[alias.asname or alias.name] = sub
                continue
            self.edges.add(base)
            if _private(alias.name):
                self._use(base, alias.name)
            if alias.name in self.pkg.classes[base]:
                self.class_names[alias.asname or alias.name] = (base, alias.name)

    # -- what an expression names ------------------------------------------------------------------------

    def _resolve(self, node: ast.AST, instances: dict[str, tuple[str, str]]):
        """("module", m) or ("class", (m, C)) or ("instance", (m, C)) for what `node` names, else None."""
        if isinstance(node, ast.Name):
            if node.id in instances:
                return "instance", instances[node.id]
            if node.id in self.class_names:
                return "class", self.class_names[node.id]
            if node.id in self.modules:
                return "module", self.modules[node.id]
            return None
        if isinstance(node, ast.Attribute):
            owner = self._resolve(node.value, instances)
            if owner is not None and owner[0] == "module":
                m = owner[1]
                if f"{m}.{node.attr}" in self.pkg.trees:
                    return "module", f"{m}.{node.attr}"
                if node.attr in self.pkg.classes[m]:
                    return "class", (m, node.attr)
        return None

    def _class_of(self, node: ast.AST | None, instances) -> tuple[str, str] | None:
        r = self._resolve(node, instances) if node is not None else None
        return r[1] if r is not None and r[0] == "class" else None

    def _check_attribute(self, owner: ast.AST, attr: str, instances) -> None:
        if not _private(attr):
            return
        r = self._resolve(owner, instances)
        if r is None:
            self._check_member(owner, attr)
            return
        kind, what = r
        if kind == "module" and f"{what}.{attr}" not in self.pkg.trees:
            self._use(what, attr)
        elif kind in ("class", "instance"):
            self._use(what[0], what[1], attr)

    def _check_member(self, owner: ast.AST, attr: str) -> None:
        """`x._m` where x's class is not known here: a use of another module's class member if a class there
        defines `_m` and none here does (receivers `self`, `cls` and names imported from outside the package
        are left alone)."""
        if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in self.external):
            return
        if any(attr in names for names in self.pkg.members[self.mod].values()):
            return
        for m, classes in self.pkg.members.items():
            for c, names in classes.items():
                if attr in names:
                    self._use(m, c, attr)

    # -- scopes: which names hold instances of imported classes ------------------------------------------

    def _bindings(self, body: list[ast.stmt], args: ast.arguments | None, outer: dict) -> dict:
        """`outer`'s names holding instances of imported classes, with those the block and its arguments bind."""
        instances = dict(outer)
        if args is not None:
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    for n in _annotation_names(a.annotation):
                        c = self._class_of(n, outer)
                        if c:
                            instances[a.arg] = c
        for node in _walk_scope(body):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                c = self._class_of(node.value.func, outer)
                for t in node.targets:
                    if c and isinstance(t, ast.Name):
                        instances[t.id] = c
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                for n in _annotation_names(node.annotation):
                    c = self._class_of(n, outer)
                    if c:
                        instances[node.target.id] = c
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if isinstance(item.context_expr, ast.Call) and isinstance(item.optional_vars, ast.Name):
                        c = self._class_of(item.context_expr.func, outer)
                        if c:
                            instances[item.optional_vars.id] = c
        return instances

    def _scope(self, body: list[ast.stmt], heads: list, outer: dict, args: ast.arguments | None = None) -> None:
        """Check a block (a module, class or function body) and, in their own scopes, what it defines; `heads`
        are the nodes of its decorators, bases, defaults and annotations, evaluated outside it."""
        instances = self._bindings(body, args, outer)
        for node in _walk_scope(body) + heads:
            if isinstance(node, ast.Attribute):
                self._check_attribute(node.value, node.attr, instances)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                self._check_attribute(node.args[0], node.args[1].value, instances)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = node.body if isinstance(node.body, list) else [ast.Expr(node.body)]
                outside = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                outside += [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
                if not isinstance(node, ast.Lambda):
                    outside += node.decorator_list + ([node.returns] if node.returns is not None else [])
                self._scope(inner, [n for x in outside for n in ast.walk(x)], instances, node.args)
            elif isinstance(node, ast.ClassDef):
                outside = node.bases + node.keywords + node.decorator_list
                self._scope(node.body, [n for x in outside for n in ast.walk(x)], instances)


def _walk_scope(body: list[ast.stmt]) -> list[ast.AST]:
    """Every node of a block, nested blocks included, but not the insides of nested functions and classes
    (those nodes themselves are returned: their scopes are read on their own)."""
    out, todo = [], list(reversed(body))
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        todo.extend(reversed(list(ast.iter_child_nodes(node))))
    return out


# -- the two rules ---------------------------------------------------------------------------------------

def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of two or more modules."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start, inside = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & inside):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}: not a strongly connected component")


def check(root: Path) -> dict[str, str]:
    """Every problem found in the package at `root`: its KNOWN-style key -> a line explaining it."""
    pkg = Package(root)
    readers = {m: ModuleReader(pkg, m) for m in pkg.trees}
    graph = {m: r.edges - {m} for m, r in readers.items()}
    problems = {}
    for comp in _components(graph):
        key = "cycle: " + ", ".join(pkg.short(m) for m in comp)
        problems[key] = "import cycle: " + " -> ".join(pkg.short(m) for m in _one_cycle(graph, comp))
    for r in readers.values():
        for p in r.private:
            problems[p] = p
    return problems


def _compare(found: dict[str, str], kind: str, known: set[str]) -> list[str]:
    """What differs from `known` among the problems of one kind: new ones, and known ones that are gone."""
    found = {k: v for k, v in found.items() if k.startswith(kind)}
    known = {k for k in known if k.startswith(kind)}
    lines = [f"new: {found[k]}  (key {k!r})" for k in sorted(set(found) - known)]
    lines += [f"fixed, remove it from KNOWN: {k!r}" for k in sorted(known - set(found))]
    return lines


def test_no_import_cycles_inside_the_package():
    problems = _compare(check(PACKAGE), "cycle:", KNOWN)
    assert not problems, "\n".join(problems)


def test_no_module_uses_another_modules_underscore_names():
    problems = _compare(check(PACKAGE), "private:", KNOWN)
    assert not problems, "\n".join(problems)


def test_known_lists_only_these_two_kinds():
    assert all(k.startswith(("cycle: ", "private: ")) for k in KNOWN)


# -- the checker, on a package made up for it --------------------------------------------------------------

FAKE = {
    "__init__.py": "from .a import PUBLIC\n__version__ = '1'\n",
    "_hidden.py": "X = 1\n",
    "a.py": """
        from . import _hidden
        PUBLIC, _mine = 1, 2

        class Reader:
            def _read(self):
                return self._own()  # its own member: fine

            def _own(self):
                return _mine

        def _helper():
            return _hidden.X
    """,
    "b.py": """
        def later():
            from .c import go  # inside a function: still an edge
            return go
    """,
    "c.py": """
        from .b import later
        go = later
    """,
    "d.py": """
        import os

        import weightpack_fake.a as alias
        from . import __version__, a
        from .a import Reader, _helper
        from .sub import e


        class Local:
            def __init__(self):
                self._cache = {}

            def _own(self):  # the name of a member of a.Reader too: here, this module's own
                return self._cache


        def f(r: "Reader", readers, local):
            with Reader() as w:
                w._read()
            x = Reader()
            x._read()
            for y in readers:
                y._read()  # y's class is not known here; _read is a member of a.Reader
            local._own()
            os._exit  # outside the package
            return r._read(), a._helper, alias._mine, getattr(a, "_mine"), Reader._read, e.__name__, __version__
    """,
    "sub/__init__.py": "",
    "sub/e.py": """
        from .. import a
        from ..a import PUBLIC
        from .f import g
    """,
    "sub/f.py": """
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:  # an edge all the same
            from .e import PUBLIC as g
    """,
}


def _fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "weightpack_fake"
    for name, text in FAKE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_the_checker_finds_cycles_and_underscore_names(tmp_path):
    found = check(_fake_package(tmp_path))
    assert set(found) == {
        "cycle: b, c",
        "cycle: sub.e, sub.f",
        "private: d -> a._helper",
        "private: d -> a._mine",
        "private: d -> a.Reader._read",
    }, sorted(found)
    assert found["cycle: b, c"] == "import cycle: b -> c -> b"


def test_known_entries_that_no_longer_occur_fail(tmp_path):
    found, known = check(_fake_package(tmp_path)), {"cycle: b, c", "private: d -> a._gone"}
    problems = _compare(found, "cycle:", known) + _compare(found, "private:", known)
    assert "fixed, remove it from KNOWN: 'private: d -> a._gone'" in problems
    assert any(p.startswith("new: import cycle: sub.e -> sub.f -> sub.e") for p in problems)
    assert not any("b, c" in p for p in problems)
