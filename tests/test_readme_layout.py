"""README.md's layout is the tree: every module of reverse_sd/ is listed
under its folder, and every listed path exists."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def _layout_lines() -> list[str]:
  text = (REPO / 'README.md').read_text()
  assert '## Layout' in text, 'README.md lost its "## Layout" section'
  section = text.split('## Layout', 1)[1]
  block = re.search(r'```\n(.*?)```', section, re.S)
  assert block, 'no code block under "## Layout" in README.md'
  return [line for line in block.group(1).splitlines() if line.strip()]


def _listed() -> dict[str, list[str]]:
  """folder -> the names listed on its line."""
  listed = {}
  folder = None
  for line in _layout_lines():
    if line[0].isspace():  # The folder's list goes on.
      listed[folder] += line.split()
      continue
    folder, *rest = line.split()
    listed[folder] = rest
  return listed


def test_every_package_module_is_listed_under_its_folder():
  listed = _listed()
  package = REPO / 'reverse_sd'
  folders = [package] + sorted(p.parent for p in package.rglob('*/__init__.py'))
  for folder in folders:
    key = f'{folder.relative_to(REPO)}/'
    assert key in listed, f'README.md layout has no line for {key}'
    modules = {p.name for p in folder.iterdir()
               if p.suffix in ('.py', '.cc', '.h')} - {'__init__.py'}
    names = {n for n in listed[key] if n.endswith(('.py', '.cc', '.h'))}
    assert names == modules, (
        f'README.md layout of {key}: missing {sorted(modules - names)}, '
        f'not in the tree {sorted(names - modules)}')


def test_every_listed_path_exists():
  for folder, names in _listed().items():
    assert (REPO / folder).is_dir(), f'README.md layout: no folder {folder}'
    for name in names:
      if re.fullmatch(r'[\w.-]+(\.\w+|/)', name):
        assert (REPO / folder / name).exists(), (
            f'README.md layout: {folder}{name} does not exist')


def test_launch_holds_shell_launchers_only():
  files = {p.name for p in (REPO / 'launch').iterdir() if p.is_file()}
  assert all(name.endswith('.sh') for name in files), sorted(files)
  assert set(_listed()['launch/']) == files
