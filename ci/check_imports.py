"""Fail on an import cycle in pyworker, or on an import across the architecture's lines.

Every ``import`` in every module counts, wherever it sits (module level, inside a function,
under ``TYPE_CHECKING``): a late import still ties the two modules together. Usage:
``python ci/check_imports.py [package_dir]``; exit 1 with each problem on a line.

The rules (who may import whom) are those of the package docstrings:

* the front end (``pyworker.frontend``) never imports executor code, the I/O core, the
  command line or the bench;
* the executor (``pyworker.executor``) never imports the front end, the command line or the
  bench;
* the I/O core imports only the shared modules and itself;
* the shared modules (``config``, ``frames``, ``commandset``, ``linux``, ``marks``) import
  nothing of pyworker.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: Compiled modules (no source to read; they import nothing of pyworker).
EXTENSIONS = ("pyworker.iocore._iocore",)

SHARED = ("pyworker.config", "pyworker.frames", "pyworker.commandset", "pyworker.linux",
          "pyworker.marks")

#: package prefix -> prefixes it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "pyworker.frontend": ("pyworker.executor", "pyworker.iocore", "pyworker.cli",
                          "pyworker.bench"),
    "pyworker.executor": ("pyworker.frontend", "pyworker.cli", "pyworker.bench"),
    "pyworker.iocore": ("pyworker.frontend", "pyworker.executor", "pyworker.cli",
                        "pyworker.bench", "pyworker.config", "pyworker.commandset"),
    **{name: ("pyworker.",) for name in SHARED},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, modules: set[str]) -> set[str]:
    """The pyworker modules that ``path`` imports."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: b is a module if there is one, else a name in a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".") or (
        prefix.endswith(".") and name.startswith(prefix))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check(root: Path) -> list[str]:
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(root, p) for p in paths} | set(EXTENSIONS)
    graph = {module_name(root, p): imports_of(root, p, modules) for p in paths}
    graph.update({name: set() for name in EXTENSIONS})
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for module, targets in sorted(graph.items()):
        for owner, banned in FORBIDDEN.items():
            if not within(module, owner):
                continue
            for target in sorted(targets):
                allowed_shared = owner.startswith("pyworker.iocore") and target in (
                    "pyworker.frames",)
                if within(target, owner) or allowed_shared:
                    continue
                if any(within(target, b) for b in banned):
                    problems.append(f"{module} imports {target}: {owner} must not import "
                                    f"{', '.join(b.rstrip('.') for b in banned)}")
    return problems


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent.parent / "pyworker")
    root = root.resolve()  # module_name() needs the files' paths under the same root
    problems = check(root)
    for problem in problems:
        print(problem)
    count = len({module_name(root, p) for p in root.rglob("*.py")})
    print(f"check_imports: {count} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
