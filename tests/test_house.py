"""The house's three layers, checked on the source: core <- io <- apps, no import cycle, small files and functions.

    core  the paper's math: layers, config, tokenizer/, diffusion/ (and small helpers with no maetok imports)
    io    files, checkpoints, run folders, model folders, converters, hub, distributed helpers, pretrained nets
    apps  train/, eval/, data/, pilot/, the CLI and its commands, the demo

A module may import its own layer and the layers below it. Imports inside functions count too (they are hidden
edges, not absent ones), and each needs a comment saying why it is not at the top of the file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "maetok"
LAYERS = {"core": 0, "io": 1, "apps": 2}
# First matching prefix wins; every module of the package must match one (a new file is placed on purpose).
PLACES = [
    ("maetok.layers", "core"), ("maetok.config", "core"), ("maetok.version", "core"), ("maetok.device", "core"),
    ("maetok.progress", "core"), ("maetok.tokenizer", "core"), ("maetok.diffusion", "core"),
    ("maetok.io", "io"), ("maetok.nets", "io"),
    ("maetok.train", "apps"), ("maetok.eval", "apps"), ("maetok.data", "apps"), ("maetok.pilot", "apps"),
    ("maetok.cli", "apps"), ("maetok.commands", "apps"), ("maetok.demo", "apps"), ("maetok.sweep", "apps"),
    ("maetok.plugins", "apps"),
]
FACE = "maetok"  # the package face re-exports the public API from every layer
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {"build_parser"}  # the argparse builder: one flat list of options


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    for prefix, layer in PLACES:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def imports_of(path: Path, module: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, inside a function) for every import statement in `path`."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = package[:len(package) - child.level + 1] if child.level else []
                stem = ".".join(base + ([child.module] if child.module else []))
                targets = [stem] + [f"{stem}.{alias.name}" for alias in child.names]
            else:
                visit(child, nested)
                continue
            # the deepest name that is a module: `from .x import y` imports module x.y or names of x
            for target in targets:
                if target in modules and target != module:
                    found.append((target, child.lineno, in_function))
        return None

    visit(tree, False)
    return found


def scan(root: Path) -> dict:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {m: (files[m], imports_of(files[m], m, modules)) for m in files}


def upward_imports(root: Path) -> list[str]:
    problems = []
    for module, (path, imports) in scan(root).items():
        if module == root.name:
            continue
        layer = layer_of(module.replace(root.name, "maetok", 1))
        if layer is None:
            problems.append(f"{path}: module {module} is in no layer; add it to PLACES in tests/test_house.py")
            continue
        for target, line, _ in imports:
            target_layer = layer_of(target.replace(root.name, "maetok", 1))
            if target == root.name or (target_layer and LAYERS[target_layer] > LAYERS[layer]):
                problems.append(f"{path}:{line}: {module} ({layer}) imports {target} ({target_layer or 'the face'})")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    graph = {m: {t for t, _, _ in imports} for m, (_, imports) in scan(root).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongly_connected(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongly_connected(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongly_connected(v)
    return cycles


def unexplained_inner_imports(root: Path) -> list[str]:
    problems = []
    for module, (path, _) in scan(root).items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        problems.append(f"{path}:{inner.lineno}: import inside {node.name}() without a reason")
    return sorted(set(problems))


def long_code(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            problems.append(f"{path}: {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in LONG_FUNCTIONS_ALLOWED:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path}:{node.lineno}: {node.name}() has {length} lines")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The package itself
# --------------------------------------------------------------------------------------------------------------
def test_imports_point_down_only():
    assert upward_imports(SRC) == []


def test_no_import_cycles():
    assert import_cycles(SRC) == []


def test_imports_inside_functions_say_why():
    assert unexplained_inner_imports(SRC) == []


def test_files_and_functions_stay_small():
    assert long_code(SRC) == []


# --------------------------------------------------------------------------------------------------------------
# The checks themselves, on a small package made for them
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_house(tmp_path: Path) -> Path:
    root = tmp_path / "maetok"
    files = {
        "__init__.py": "from .tokenizer.model import MAETok\n",
        "layers.py": "import torch\n",
        "tokenizer/__init__.py": "",
        "tokenizer/model.py": "from ..layers import torch\n",
        "io/__init__.py": "",
        "io/pretrained.py": "from ..tokenizer.model import MAETok\n",
        "train/__init__.py": "",
        "train/run.py": "from ..io.pretrained import MAETok\n\n\ndef go():\n    import json  # an example\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_clean_house_passes(tiny_house: Path):
    assert upward_imports(tiny_house) == [] and import_cycles(tiny_house) == []
    assert unexplained_inner_imports(tiny_house) == [] and long_code(tiny_house) == []


def test_an_upward_import_is_caught(tiny_house: Path):
    (tiny_house / "tokenizer" / "model.py").write_text("from ..layers import torch\nfrom ..train.run import go\n")
    problems = upward_imports(tiny_house)
    assert len(problems) == 1 and "maetok.tokenizer.model (core) imports maetok.train.run (apps)" in problems[0]
    assert import_cycles(tiny_house) == [["maetok.io.pretrained", "maetok.tokenizer.model", "maetok.train.run"]]


def test_an_upward_import_inside_a_function_is_caught_too(tiny_house: Path):
    (tiny_house / "io" / "pretrained.py").write_text(
        "from ..tokenizer.model import MAETok\n\n\ndef load():\n    from ..train import run  # hidden\n")
    problems = upward_imports(tiny_house)  # the package train/ and its module run, both named
    assert [p.split(": ", 1)[1] for p in problems] == ["maetok.io.pretrained (io) imports maetok.train (apps)",
                                                       "maetok.io.pretrained (io) imports maetok.train.run (apps)"]
    assert all(p.startswith(f"{tiny_house / 'io' / 'pretrained.py'}:5") for p in problems)


def test_a_new_module_must_be_placed_in_a_layer(tiny_house: Path):
    (tiny_house / "misc.py").write_text("")
    assert "module maetok.misc is in no layer" in upward_imports(tiny_house)[0]


def test_an_unexplained_inner_import_and_a_long_function_are_caught(tiny_house: Path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tiny_house / "train" / "run.py").write_text(f"def go():\n    import json\n{body}")
    assert unexplained_inner_imports(tiny_house) == [f"{tiny_house / 'train' / 'run.py'}:2: import inside go() "
                                                     f"without a reason"]
    assert long_code(tiny_house) == [f"{tiny_house / 'train' / 'run.py'}:1: go() has {MAX_FUNCTION_LINES + 2} lines"]
