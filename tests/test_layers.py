"""The three layers of DESIGN.md, checked on the source: core <- methods <- surface.

- The core (medct/ without the surface) never imports a method package (pretrain, finetune,
  synthesis, registration) nor the surface: a method reaches the core through a table it
  registers in (nets, adaptation methods, predictors).
- A method package never imports the surface.
- No two core modules import each other, directly or round a circle (imports inside functions
  count too: a lazy import is still a dependency).

Every `import` and `from ... import` of every file is read with `ast`, at any depth.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pretrain", "finetune", "synthesis", "registration")  # installed as medct.<name>
# What parses a user's command line or notebook call. `medct.lightning_cli` (MedCTCLI: a YAML recipe
# -> task, data module, trainer) is the core's training engine, which Turbolift's chain also runs.
SURFACE = ("medct.cli", "medct.commands", "medct.api", "medct.demo")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in METHODS:
        parts = ["medct", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from medct import api` names medct.api
    return out


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _core_files() -> list[Path]:
    return [p for p in _files("medct") if not _within(_module_name(p), SURFACE)]


def test_the_core_imports_no_method_and_no_surface() -> None:
    banned = (*(f"medct.{m}" for m in METHODS), *METHODS, *SURFACE)
    offences = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in _core_files()
        for name in sorted(_imports(p))
        if _within(name, banned)
    ]
    assert not offences, "the core must not import methods or the surface:\n" + "\n".join(offences)


def test_methods_do_not_import_the_surface() -> None:
    offences = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in _files(*METHODS)
        for name in sorted(_imports(p))
        if _within(name, SURFACE)
    ]
    assert not offences, "a method must not import the surface:\n" + "\n".join(offences)


def test_core_modules_import_no_circle() -> None:
    files = _core_files()
    modules = {_module_name(p) for p in files}
    graph = {
        _module_name(p): {n for n in _imports(p) if n in modules and n != _module_name(p) and n != "medct"}
        for p in files
    }
    # a package's __init__ re-exporting its submodules is not a circle with them
    graph = {
        m: {n for n in deps if not m.startswith(n + ".") and not n.startswith(m + ".")} for m, deps in graph.items()
    }
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circles.append([*path[path.index(n) :], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles in the core:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_layer_check_sees_an_offence(tmp_path: Path) -> None:
    """The checks above read real imports: a nested, relative import of a method is found."""
    fake = ROOT / "medct" / "_layer_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("def f():\n    from .finetune import tta\n    import medct.api\n")
        found = _imports(fake)
    finally:
        fake.unlink()
    assert {"medct.finetune", "medct.finetune.tta", "medct.api"} <= found
