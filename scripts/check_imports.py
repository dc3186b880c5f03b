"""The import graph of sdengine, checked: no cycles, and no module that imports another's private name.

    python scripts/check_imports.py            # prints the problems; exit status 1 if there are any
    python scripts/check_imports.py --edges    # also prints every edge, importer -> imported

Reads the source with `ast` (nothing is imported or run). Every import counts, those inside
functions too (a lazy import still ties two modules together), except those under
`if TYPE_CHECKING:`. The modules are sdengine/ and the top-level kernels/ and export/ folders,
which are sdengine.kernels and sdengine.export (their faces' __path__ reaches them).

Rules (issue 31):
- no cycle: no two modules import each other, directly or through others. The one import
  allowed to run from a lower layer up is the package face's: sdengine/__init__.py's lazy
  `from .api import ...` (edges out of sdengine/__init__.py are not followed);
- no private names across modules: `from M import _name` or `M._name` where M is another
  sdengine module and _name is not itself a module (private modules such as `_C` and
  `_triton` are fine).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (folder, the package it is) in the import namespace
SOURCES = (("sdengine", "sdengine"), ("kernels", "sdengine.kernels"), ("export", "sdengine.export"))
FACE = "sdengine"  # its lazy import of api.py is the one edge allowed to run upwards


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES:
        folder = root / folder
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import / ImportFrom nodes of a module, without those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def graph(found: dict[str, Path]):
    """(edges, private uses): edges[importer] = {imported}; private uses as (importer, module, name)."""
    edges: dict[str, set] = {name: set() for name in found}
    private = []
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases = {}  # local name -> project module it is bound to
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _longest_module(alias.name, found)
                    if target:
                        edges[name].add(target)
                        if alias.asname and alias.name == target:
                            aliases[alias.asname] = target
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in found:
                    edges[name].add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                elif base in found:
                    edges[name].add(base)
                    if _private(alias.name) and not _private_module(base, alias.name, found):
                        private.append((name, base, alias.name))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and not _private_module(aliases[node.value.id], node.attr, found)
                    and aliases[node.value.id] != name):
                private.append((name, aliases[node.value.id], node.attr))
        edges[name].discard(name)
    return edges, sorted(set(private))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_module(module: str, name: str, found: dict[str, Path]) -> bool:
    """Whether module.name is a module (a compiled one such as _C included), or module is itself
    private (_triton): the names of private modules are theirs to share within the package."""
    if f"{module}.{name}" in found or _private(module.rpartition(".")[2]):
        return True
    if found[module].name != "__init__.py":
        return False
    folder = found[module].parent
    return (folder / f"{name}.so").exists() or any(folder.glob(f"{name}.*.so"))


def _longest_module(dotted: str, found) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in found:
            return ".".join(parts[:n])
    return None


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), the face's edges left out."""
    followed = {name: (set() if name == FACE else targets) for name, targets in edges.items()}
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(followed[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(followed):
        if v not in index:
            visit(v)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", action="store_true", help="print every edge too")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    args = parser.parse_args(argv)
    found = modules(args.root)
    edges, private = graph(found)
    if args.edges:
        for name in sorted(edges):
            for target in sorted(edges[name]):
                print(f"{name} -> {target}")
    problems = 0
    for component in cycles(edges):
        problems += 1
        ties = [f"{a} -> {b}" for a in component for b in sorted(edges[a]) if b in component]
        print(f"cycle: {', '.join(component)}  ({'; '.join(ties)})")
    for importer, module, attr in private:
        problems += 1
        print(f"private name: {importer} uses {module}.{attr}")
    print(f"{len(found)} modules, {sum(len(t) for t in edges.values())} imports: "
          f"{'no cycle, no private name across modules' if not problems else f'{problems} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
