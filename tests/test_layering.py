"""The package's layering, read from the source with `ast` (nothing imported).

Data flows one way (STYLE.md): no import cycle among reverse_sd's modules,
counting imports inside functions; `models/` is plain Flax and reads no
checkpoint, data set or text encoder (`reverse_sd.pretrained` loads those into
it); `optim` knows no model. An import inside a function stays only for a
heavy optional dependency and says so in a comment.

Rule for function-level imports: every import inside a function of a
non-standard-library module (reverse_sd's own, third-party, `configs`) has a
comment (not a bare pylint directive) on its line, or directly above the run
of imports it starts or belongs to. Exempt: the entry points' `main` /
`_main` functions, which do process set-up, and `if __name__ == '__main__'`
blocks (module level).
"""

import ast
import collections
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'reverse_sd'
ENTRY_FUNCTIONS = ('main', '_main')


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imported(module: str, node: ast.AST) -> list[str]:
  """The modules an import statement names (absolute)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ''
  if node.level:
    package = module.split('.')
    if MODULES[module].name != '__init__.py':
      package = package[:-1]
    package = package[:len(package) - node.level + 1]
    base = '.'.join(package + ([base] if base else []))
  return [f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES
          else base for alias in node.names]


def _own_module(name: str) -> str | None:
  """The reverse_sd module that `name` is or lies in, else None."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name or None


def _imports(module: str):
  """(import node, enclosing function name or None) of every import."""
  tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
  found = []

  def visit(node, function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        found.append((child, function))
      inner = (child.name if isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)
      visit(child, inner)

  visit(tree, None)
  return found


def _graph() -> dict[str, set[str]]:
  graph = {}
  for module in MODULES:
    targets = set()
    for node, _ in _imports(module):
      for name in _imported(module, node):
        own = _own_module(name)
        if own and own != module:
          targets.add(own)
    graph[module] = targets
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle, as [a, b, ..., a], or None."""
  state = {}  # module -> 'open' | 'done'
  stack = []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == 'open':
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[module] = 'done'
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  cycle = _find_cycle(_graph())
  assert cycle is None, (
      'Import cycle among reverse_sd modules (function-level imports count): '
      + ' -> '.join(cycle) + '. Move what both need to the lower module or to '
      'a small module both import.')


def _imports_under(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
  graph = _graph()
  return [f'{module} imports {target}' for module in sorted(graph)
          if module == prefix or module.startswith(prefix + '.')
          for target in sorted(graph[module])
          if any(target == f or target.startswith(f + '.') for f in forbidden)]


def test_models_import_no_converter_data_or_text():
  bad = _imports_under('reverse_sd.models', (
      'reverse_sd.convert', 'reverse_sd.data', 'reverse_sd.text'))
  assert not bad, (
      'reverse_sd/models/ is plain Flax and reads no file: ' + '; '.join(bad)
      + '. Load weights, configs or contexts in reverse_sd/pretrained.py and '
      'pass them in.')


def test_optim_imports_no_model_code():
  bad = _imports_under('reverse_sd.optim', ('reverse_sd.models',))
  assert not bad, '; '.join(bad) + ': the optimiser must not know the model.'


def _is_stdlib(name: str) -> bool:
  return name.split('.')[0] in sys.stdlib_module_names or name == '__future__'


def _is_pylint_directive(line: str) -> bool:
  return line.strip().lstrip('#').strip().startswith('pylint:')


def _has_reason(lines: list[str], node: ast.AST,
                import_lines: set[int]) -> bool:
  """A comment, not a pylint directive, on the import's line or above the
  run of imports (and pylint directives) it belongs to."""
  trailing = lines[node.lineno - 1].split('#')[1:]
  if any(c.strip() and not c.strip().startswith('pylint:') for c in trailing):
    return True
  above = node.lineno - 1  # 1-based number of the line above.
  while above >= 1 and (above in import_lines or (
      lines[above - 1].strip().startswith('#') and
      _is_pylint_directive(lines[above - 1]))):
    above -= 1
  return above >= 1 and lines[above - 1].strip().startswith('#')


def test_function_level_imports_say_why():
  missing = []
  for module, path in MODULES.items():
    lines = path.read_text().splitlines()
    imports = _imports(module)
    import_lines = {line for node, _ in imports
                    for line in range(node.lineno, node.end_lineno + 1)}
    for node, function in imports:
      if function is None or function in ENTRY_FUNCTIONS:
        continue
      names = _imported(module, node)
      if all(_is_stdlib(name) for name in names):
        continue
      if not _has_reason(lines, node, import_lines):
        missing.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} '
                       f'({function}: {", ".join(names)})')
  assert not missing, (
      'Function-level imports without a comment saying why (a heavy '
      'optional dependency; otherwise import at the top): '
      + '; '.join(missing))


def test_module_file_names_are_unique():
  by_name = collections.defaultdict(list)
  for path in MODULES.values():
    if path.name != '__init__.py':
      by_name[path.name].append(str(path.relative_to(PACKAGE.parent)))
  shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
  assert not shared, f'Modules sharing a file name: {shared}; rename one.'


def test_cycle_finder_reports_a_cycle():
  cycle = _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()})
  assert cycle == ['a', 'b', 'c', 'a']
