"""Cache keys of the workflow's code: a hash, per rule script, of the fnprune code it runs.

Snakemake re-runs a job when its params, inputs or rule code change, but it does not track the
files a ``script:`` runs, nor the package that script imports. Each rule therefore carries the
key of its script as a param (``code``): the script itself and, function by function, every
definition of ``fnprune`` it can reach (calls, references, imports inside functions), followed
across modules. A change to ``fnprune.ica.fastica_cube`` re-runs the ICA jobs and what depends on
them, not the perplexity of the dense model.

Keys hash the abstract syntax tree, so comments, docstrings and formatting do not change them;
the package's data files (``tasks/*.yaml``) count for the definitions that locate files
through ``__file__``. Pure ``ast``: building the DAG imports no torch.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .io import write_json  # imported by the DAG's modules already

PACKAGE = "fnprune"


def _strip_docstring(node: ast.AST) -> None:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            _strip_docstring(node)
    return tree


def _dump(node: ast.AST) -> str:
    return ast.dump(node, annotate_fields=False, include_attributes=False)


@dataclass
class _Module:
    name: str  # "ica" for fnprune.ica, "" for the package's __init__
    defs: dict[str, ast.AST] = field(default_factory=dict)  # top-level def/class/assignment by name
    rest: list[ast.AST] = field(default_factory=list)  # other top-level statements (imports, ...)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local name -> (module, attr)


def _resolve(level: int, module: str | None, current: str) -> str | None:
    """The fnprune module an import names ("" is the package itself), or None when it is outside."""
    if level == 0:
        if module == PACKAGE:
            return ""
        if module and module.startswith(PACKAGE + "."):
            return module[len(PACKAGE) + 1 :]
        return None
    if current == "<script>":
        return None
    return module or ""  # fnprune is flat: a relative import resolves against the package


def _bindings(stmts: list[ast.AST], current: str) -> dict[str, tuple[str, str | None]]:
    """Local name -> (fnprune module, attribute or None) of import statements."""
    out: dict[str, tuple[str, str | None]] = {}
    for sub in stmts:
        if isinstance(sub, ast.ImportFrom):
            mod = _resolve(sub.level, sub.module, current)
            if mod is None:
                continue
            for alias in sub.names:
                local = alias.asname or alias.name
                # `from fnprune import stages` names a module; `from .io import write_json` a definition
                out[local] = (mod, alias.name)
        elif isinstance(sub, ast.Import):
            for alias in sub.names:
                mod = _resolve(0, alias.name, current)
                if mod is not None:
                    out[alias.asname or alias.name.split(".")[0]] = (mod, None) if alias.asname else ("", None)
    return out


class _Package:
    def __init__(self, root: Path):
        self.root = root
        self.modules: dict[str, _Module] = {}
        self.memo: dict[tuple[str, str], tuple[str, list]] = {}  # (module, name) -> (dump, targets)

    def info(self, mod: _Module, name: str, nodes: list[ast.AST]) -> tuple[str, list]:
        """The dump of a definition (or of a module's other statements) and what it reaches."""
        key = (mod.name, name)
        if key not in self.memo:
            targets = [t for node in nodes for t in _targets(self, mod, node)]
            dump = "|".join(_dump(n) for n in nodes)
            if any(isinstance(sub, ast.Name) and sub.id == "__file__" for n in nodes for sub in ast.walk(n)):
                # a definition that locates files beside the code: the package's data files count
                dump += "|" + "|".join(
                    f"{p.relative_to(self.root)}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
                    for p in self.data_files()
                )
            self.memo[key] = (dump, targets)
        return self.memo[key]

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def _path(self, name: str) -> Path:
        return self.root / ("__init__.py" if not name else name.replace(".", "/") + ".py")

    def module(self, name: str) -> _Module:
        if name in self.modules:
            return self.modules[name]
        tree = ast.parse(self._path(name).read_text(), filename=str(self._path(name)))
        mod = _Module(name)
        imports: list[ast.AST] = []
        for sub in ast.walk(tree):  # one walk: docstrings out, imports found
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                imports.append(sub)
            elif isinstance(sub, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                _strip_docstring(sub)
        for stmt in tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                mod.defs[stmt.name] = stmt
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if names:
                    for n in names:
                        mod.defs[n] = stmt
                else:
                    mod.rest.append(stmt)
            else:
                mod.rest.append(stmt)
        mod.imports = _bindings(imports, name)
        self.modules[name] = mod
        return mod

    def data_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
        )


def _references(node: ast.AST) -> tuple[set[str], dict[str, set[str]], list[ast.AST]]:
    """Names a node reads, and for each the attributes read from it (``M.f`` -> {"M": {"f"}});
    a name also used other than as ``name.attr`` is used whole (``{"*"}``). One walk."""
    attrs: dict[str, set[str]] = {}
    bases: set[int] = set()
    names: list[ast.Name] = []
    imports: list[ast.AST] = []
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
            imports.append(sub)
        elif isinstance(sub, ast.Name):
            names.append(sub)
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            attrs.setdefault(sub.value.id, set()).add(sub.attr)
            bases.add(id(sub.value))
    bare = {n.id for n in names if id(n) not in bases}
    return {n.id for n in names}, {n: (a if n not in bare else {"*"}) for n, a in attrs.items()}, imports


def _closure(pkg: _Package, roots: list[tuple[str, str | None]]) -> list[str]:
    """Dumps of every definition reachable from ``roots`` ((module, name); name None: the whole module)."""
    seen: set[tuple[str, str | None]] = set()
    parts: list[str] = []
    todo = list(roots)
    while todo:
        mod_name, name = todo.pop()
        if (mod_name, name) in seen:
            continue
        seen.add((mod_name, name))
        if not pkg.exists(mod_name):  # an import of a name fnprune does not have
            continue
        mod = pkg.module(mod_name)
        if (mod_name, "<module>") not in seen:
            seen.add((mod_name, "<module>"))
            dump, targets = pkg.info(mod, "<module>", mod.rest)
            parts.append(f"{mod_name}:<module>:{dump}")
            todo.extend(targets)
        if name is None or name == "*":
            todo.extend((mod_name, n) for n in mod.defs)
            continue
        node = mod.defs.get(name)
        if node is None:
            if pkg.exists(f"{mod_name}.{name}" if mod_name else name):
                todo.append((f"{mod_name}.{name}" if mod_name else name, None))
            elif name in mod.imports:  # re-exported
                todo.append(mod.imports[name])
            continue
        dump, targets = pkg.info(mod, name, [node])
        parts.append(f"{mod_name}:{name}:{dump}")
        todo.extend(targets)
    return sorted(parts)


def _targets(pkg: _Package, mod: _Module, node: ast.AST) -> list[tuple[str, str | None]]:
    names, attrs, imports = _references(node)
    local = _bindings(imports, mod.name)
    out = [(mod.name, n) for n in names if n in mod.defs and n not in local]
    return out + _follow(pkg, {**mod.imports, **local}, names, attrs)


def _follow(pkg: _Package, scope: dict, names: set[str], attrs: dict[str, set[str]]) -> list[tuple[str, str | None]]:
    """The (module, name) pairs that the imported ``names`` in ``scope`` lead to."""
    out: list[tuple[str, str | None]] = []
    for n in names & set(scope):
        target_mod, attr = scope[n]
        sub = f"{target_mod}.{attr}" if target_mod and attr else (attr or target_mod)
        if attr is not None and pkg.exists(sub):
            # a module bound to a name: follow the attributes read from it
            out.extend((sub, a if a != "*" else None) for a in attrs.get(n, {"*"}))
        elif attr is None:
            out.extend((target_mod, a if a != "*" else None) for a in attrs.get(n, {"*"}))
        else:
            out.append((target_mod, attr))
    return out


def script_key(script: str | Path, package_root: str | Path | None = None, _pkg: _Package | None = None) -> str:
    """The key of one rule script: its own syntax tree and the fnprune definitions it reaches."""
    root = Path(package_root).resolve() if package_root is not None else Path(__file__).resolve().parent
    pkg = _pkg if _pkg is not None else _Package(root)
    tree = _strip_docstrings(ast.parse(Path(script).read_text(), filename=str(script)))
    names, attrs, imports = _references(tree)
    roots = _follow(pkg, _bindings(imports, "<script>"), names, attrs)
    h = hashlib.sha256(_dump(tree).encode())
    for part in _closure(pkg, roots):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def workflow_keys(
    scripts_dir: str | Path, package_root: str | Path | None = None, cache: str | Path | None = None
) -> dict[str, str]:
    """Keys of every script in ``scripts_dir`` by script name (``ica`` for ``ica.py``).

    ``cache``: a JSON file holding the keys with a hash of the contents of every file they were
    computed from; while none of those changed, the keys are read from it (every SLURM job
    parses the Snakefile) rather than computed again by parsing the whole package.
    """
    root = Path(package_root).resolve() if package_root is not None else Path(__file__).resolve().parent
    scripts = sorted(Path(scripts_dir).resolve().glob("*.py"))
    files = [*scripts, *sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    h = hashlib.sha256()
    for p in files:
        h.update(f"\0{p}\0".encode() + p.read_bytes())
    stamp = h.hexdigest()
    if cache is not None:
        try:
            held = json.loads(Path(cache).read_text())
            if held.get("stamp") == stamp:
                return held["keys"]
        except (OSError, ValueError, KeyError):
            pass
    pkg = _Package(root)
    keys = {p.stem: script_key(p, root, pkg) for p in scripts}
    if cache is not None:
        try:
            write_json(cache, {"stamp": stamp, "keys": keys})
        except OSError:
            pass  # a read-only working directory: computed every time
    return keys
