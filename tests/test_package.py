"""The shape of the package: no import cycle, small files and functions, TensorFlow only
where data is read."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "strip_mlp"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules():
  """{'strip_mlp.x.y': path} of every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
  """The package modules `name` imports anywhere in its file (also inside functions)."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for a in node.names:
        target = f"{base}.{a.name}"
        found.add(target if target in modules else base)
  return {m for m in found if m in modules and m != name}


def _find_cycle(graph: dict) -> list[str] | None:
  state = {}  # 1: on the stack, 2: done

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, stack + [nxt])
        if cycle:
          return cycle
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # A package __init__ re-exporting its modules is not a cycle when a module imports a
  # sibling module directly; only real module-to-module loops count.
  train_lib, evaluate = "strip_mlp.train.train_lib", "strip_mlp.evaluation.evaluate"
  assert train_lib in graph and evaluate in graph[train_lib]
  cycle = _find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_files_and_functions_are_small():
  too_long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    text = path.read_text()
    rel = path.relative_to(PACKAGE.parent)
    if len(text.splitlines()) > MAX_FILE_LINES:
      too_long.append(f"{rel}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        doc = ast.get_docstring(node) or ""
        if n > MAX_FUNCTION_LINES and "Longer than" not in doc:
          too_long.append(f"{rel}:{node.lineno} {node.name}(): {n} lines")
  assert not too_long, too_long


def test_package_loads_without_tensorflow():
  """`import strip_mlp` and every module outside strip_mlp/data load without TensorFlow
  (only the data pipeline imports it, when data is read; tests/test_configs.py checks the
  configs)."""
  names = sorted(n for n in _modules() if not n.startswith("strip_mlp.data"))
  code = (
      "import importlib, sys\n"
      f"for name in {names!r}:\n"
      "  importlib.import_module(name)\n"
      "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch')]\n"
      "print(bad[:3])\n"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]", proc.stdout
