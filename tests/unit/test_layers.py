"""The layering: arrows point down. ascend_ffi < xyjax.ops < models < xyjax.engine < xyjax.llm < server, bench,
CLI. Every import statement of the package sources (module level or inside a function) is checked."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYERS = [("ascend_ffi",), ("xyjax.ops",), ("models",), ("xyjax.engine",), ("xyjax.llm",),
          ("xyjax.server", "xyjax.bench", "xyjax.cli", "xyjax")]


def layer(module: str) -> int | None:
    """The layer of a project module (the longest matching prefix), None for third-party modules."""
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return None if best is None else best[0]


def imports(path: pathlib.Path):
    """(line, imported name) of every absolute import in ``path`` (the project uses no relative imports)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import"
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def test_no_module_imports_a_higher_layer():
    wrong = []
    for top in ("ascend_ffi", "xyjax", "models"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            own = layer(module)
            for line, target in imports(path):
                if layer(target) is not None and layer(target) > own:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} ({module}, layer {own}) imports {target} "
                                 f"(layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_importing_the_model_loads_no_engine_module():
    code = ("import sys, models.llama; print(sorted(m for m in sys.modules if m.startswith('xyjax.') and "
            "not m.startswith('xyjax.ops')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
