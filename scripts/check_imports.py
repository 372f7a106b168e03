#!/usr/bin/env python3
"""Check leanconv's import structure; exit 1 with one line per violation.

Three rules:

1. No import cycles between leanconv's modules. Every import counts, including those inside
   functions (a lazy import that only works around a cycle is still a cycle) and those by a
   literal name (``importlib.import_module("a.b")``, ``__import__("a.b")``), and importing
   ``a.b.c`` also runs the packages ``a.b`` above it (except those the importer lives in). A name
   held in a variable (a module a plugin registered, say) cannot be read and is not counted.
2. No module imports from a later pipeline stage (``STAGES`` below, in pipeline order).
3. No module outside ``leanconv/methods/`` names a concrete replacement layer class (a class
   decorated with ``register_layer`` in ``leanconv/methods/``): stages look layers up through
   ``leanconv.registry``.

Usage: ``python scripts/check_imports.py [package directory]`` (default: the leanconv next to
this script's parent).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

# Pipeline order: a module may import from its own stage and earlier ones only. A module's stage
# is that of the longest prefix listed (a package name covers its submodules).
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("leanconv.errors", "leanconv.fields", "leanconv.registry", "leanconv.layers",
              "leanconv.measure.timing", "leanconv.logits", "leanconv.batchnorm")),
    # the settings every stage reads: a recipe and its sections, and the plan convert writes
    ("settings", ("leanconv.recipes", "leanconv.recipes.spec", "leanconv.recipes.registry",
                  "leanconv.budget.knapsack", "leanconv.calibrate.config", "leanconv.finetune.config",
                  "leanconv.plan")),
    ("inputs", ("leanconv.data", "leanconv.models")),
    ("analysis", ("leanconv.passes",)),
    # tools the conversion stages use: saving, inference ops (convert's speed check times them),
    # export, counting and timing
    ("save", ("leanconv.serialize",)),
    ("optimize", ("leanconv.optimize", "leanconv.kernels")),
    ("export", ("leanconv.export",)),
    ("measure", ("leanconv.measure",)),
    # the conversion pipeline
    ("convert", ("leanconv.convert",)),
    ("calibrate", ("leanconv.calibrate",)),
    ("finetune", ("leanconv.finetune",)),
    # the methods implement hooks of every stage above, which reach them through leanconv.registry only
    ("methods", ("leanconv.methods",)),
    ("budget", ("leanconv.budget",)),
    ("run", ("leanconv.runconfig", "leanconv.report", "leanconv.pipeline", "leanconv.sweep", "leanconv.demo")),
    ("cli", ("leanconv.cli", "leanconv.__main__", "leanconv")),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> list[tuple[str, int]]:
    """(imported leanconv module, line) of every import in ``tree``."""
    out = []
    package = name if is_package else name.rpartition(".")[0]
    for node in walk_runtime(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in modules else base, node.lineno))
        elif (named := imported_by_name(node)) is not None:
            out.append((named, node.lineno))
    result = []
    for mod, line in out:
        while mod and mod not in modules:  # an attribute of a module: the module
            mod = mod.rpartition(".")[0]
        if mod:
            result.append((mod, line))
    return result


def imported_by_name(node: ast.AST) -> str | None:
    """The module an ``importlib.import_module("...")`` or ``__import__("...")`` call names literally."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    first = node.args[0]
    if called in ("import_module", "__import__") and isinstance(first, ast.Constant) and \
            isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def walk_runtime(tree: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:`` blocks (imports that never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def stage_of(mod: str) -> int:
    best, rank = -1, len(STAGES)
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def layer_classes(root: Path) -> set[str]:
    names = set()
    for path in (root / "methods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                for d in node.decorator_list:
                    f = d.func if isinstance(d, ast.Call) else d
                    if (f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")) == "register_layer":
                        names.add(node.name)
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph.get(v, ()):
                    out.append(sorted(comp))
    return out


def check(root: Path) -> list[str]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    classes = layer_classes(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(root.parent)
        mine = stage_of(mod)
        for target, line in imports_of(tree, mod, path.name == "__init__.py", modules):
            if target == mod:
                continue
            graph[mod].add(target)
            parts = target.split(".")
            for k in range(2, len(parts)):  # the packages the import runs, outside the importer's own
                pkg = ".".join(parts[:k])
                if pkg in modules and not (mod == pkg or mod.startswith(pkg + ".")):
                    graph[mod].add(pkg)
            theirs = stage_of(target)
            if theirs > mine and not mod.startswith(target + "."):
                problems.append(f"{rel}:{line}: {mod} ({STAGES[mine][0]}) imports {target} from a later stage "
                                f"({STAGES[theirs][0]})")
        if not mod.startswith("leanconv.methods"):
            for node in walk_runtime(tree):
                named = None
                if isinstance(node, ast.Name):
                    named = node.id
                elif isinstance(node, ast.Attribute):
                    named = node.attr
                elif isinstance(node, ast.alias):
                    named = node.name.rpartition(".")[2]
                if named in classes:
                    problems.append(f"{rel}:{getattr(node, 'lineno', '?')}: {mod} names the layer class {named} "
                                    f"(look it up through leanconv.registry)")
    for comp in cycles(graph):
        problems.append(f"import cycle: {' <-> '.join(comp)}")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "leanconv"
    if not (root / "__init__.py").is_file():
        print(f"check_imports: {root} is not a package directory", file=sys.stderr)
        return 2
    problems = check(root.resolve())
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
