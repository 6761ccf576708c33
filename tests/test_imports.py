"""The package's modules import in one direction: no module reaches, even inside a function, a
module that imports it back (settings -> data -> settings once hid that way)."""
import ast
import pathlib
import pkgutil

import resmem_jax

PACKAGE = "resmem_jax"


def module_files(package_dir: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """``{dotted name: file}`` of every module under ``package_dir``, found without importing any
  (importing would run the very cycles this looks for)."""
  files = {package: package_dir / "__init__.py"}
  for info in pkgutil.iter_modules([str(package_dir)]):
    name = f"{package}.{info.name}"
    if info.ispkg:
      files.update(module_files(package_dir / info.name, name))
    else:
      files[name] = package_dir / f"{info.name}.py"
  return files


def _source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  """The module a ``from ... import`` reads from, relative ones resolved against ``module``."""
  if not node.level:
    return node.module
  parts = module.split(".") if is_package else module.split(".")[:-1]
  parts = parts[:len(parts) - node.level + 1]
  return ".".join(parts + ([node.module] if node.module else []))


def _reached(name: str, module: str, files) -> set[str]:
  """What importing ``name`` from ``module`` runs: ``name`` itself, and each package above it
  that ``module`` is not inside (from outside, ``import a.b`` runs ``a/__init__`` too; from inside,
  that ``__init__`` is what imports the package's modules, so it is not an edge back)."""
  parts = name.split(".")
  above = {".".join(parts[:i]) for i in range(1, len(parts))}
  outside = {p for p in above if module != p and not module.startswith(p + ".")}
  return ({name} | outside) & set(files)


def import_graph(files: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """``{module: modules it imports}`` among ``files``: every import statement counts, at module
  level, inside functions or under ``if``."""
  graph = {}
  for module, path in files.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        source = _source(node, module, path.name == "__init__.py")
        # ``from pkg import sub`` reaches the module pkg.sub; ``from pkg import name``, pkg.
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                 for a in node.names]
      else:
        continue
      for name in names:
        edges |= _reached(name, module, files)
    edges.discard(module)
    graph[module] = edges
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One shortest cycle per strongly connected group of modules (Tarjan), as ``[a, b, ..., a]``."""
  index, low, on_stack, stack, groups = {}, {}, set(), [], []

  def visit(start):
    # Iterative Tarjan: a recursive one would hit the recursion limit on a long chain.
    work = [(start, iter(sorted(graph.get(start, ()))))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        group = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          group.add(member)
          if member == node:
            break
        if len(group) > 1:
          groups.append(group)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph, group: set[str]) -> list[str]:
  """The shortest cycle through the group's first module, by breadth-first search inside it."""
  start = min(group)
  parents, frontier = {start: None}, [start]
  while frontier:
    following = []
    for node in frontier:
      for child in sorted(graph[node] & group):
        if child == start:
          path = [node]
          while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
          return path[::-1] + [start]
        if child not in parents:
          parents[child] = node
          following.append(child)
    frontier = following
  raise AssertionError(f"{sorted(group)} is not strongly connected")


def _describe(cycles) -> str:
  return "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_package_has_no_import_cycle():
  files = module_files(pathlib.Path(resmem_jax.__file__).parent, PACKAGE)
  graph = import_graph(files)
  assert len(graph) > 50 and "resmem_jax.settings" in graph["resmem_jax.data"]  # it saw the tree
  cycles = find_cycles(graph)
  assert not cycles, f"import cycles (function-level imports count):\n{_describe(cycles)}"


def test_a_planted_cycle_is_found(tmp_path):
  package = tmp_path / "planted"
  (package / "inner").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "inner" / "__init__.py").write_text("")
  (package / "low.py").write_text("import os\n")
  # The cycle hides in a function, and runs through a relative import and a subpackage.
  (package / "top.py").write_text("from planted import low\n\ndef f():\n"
                                  "  from planted.inner import mid\n")
  (package / "inner" / "mid.py").write_text("from .. import top\n")
  graph = import_graph(module_files(package, "planted"))
  # From outside a subpackage, importing its module runs the subpackage's __init__ too.
  assert graph["planted.top"] == {"planted.low", "planted.inner", "planted.inner.mid"}
  assert graph["planted.inner.mid"] == {"planted.top"}
  assert find_cycles(graph) == [["planted.inner.mid", "planted.top", "planted.inner.mid"]]
  # The same tree without the function's import has none.
  (package / "top.py").write_text("from planted import low\n")
  assert find_cycles(import_graph(module_files(package, "planted"))) == []


def test_the_detector_finds_every_group_on_a_synthetic_graph():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
  assert find_cycles(graph) == [["d", "e", "d"], ["a", "b", "c", "a"]]
