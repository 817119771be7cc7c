"""Runs an absl entry point so that a user's mistake ends it in one line.

  if __name__ == '__main__':
    cli.run(main)

A bad flag, a config override naming an unknown key, a config file or
data folder that is not there, a value out of range: the command prints

  error: <what is wrong, naming the flag, key, file or value>

as the last line of stderr and exits with status 1, instead of a Python
traceback. `--verbose` shows the traceback as well. Any other exception (a
bug) keeps its traceback, and a `sys.exit(status)` of the entry point (e.g.
the preemption status of `reverse_sd.main`) passes through unchanged.
"""

from collections.abc import Callable, Sequence
import re
import sys
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags

VERBOSE_FLAG = 'verbose'
# Errors a user can fix from the message alone. OSError covers missing files
# and folders (FileNotFoundError) and ml_collections' "config not available"
# after a config file failed to load.
USER_ERRORS = (ValueError, OSError, app.UsageError)
# An override of an unknown key of a locked config fails while the flags are
# parsed: ml_collections raises AttributeError (attribute access) or KeyError.
_FLAG_PARSING_ERRORS = (flags.Error, AttributeError, KeyError, ValueError)
_TRACEBACK_HEADER = 'Traceback (most recent call last):'


def one_line(message: str) -> str:
  """The message on one line; of an embedded traceback, only its last line.

  ml_collections quotes the traceback of a failed `get_config` inside its
  flag error; the last line of it says what went wrong.
  """
  head, header, tail = message.partition(_TRACEBACK_HEADER)
  if header:
    tail_lines = [line.strip() for line in tail.splitlines() if line.strip()]
    message = head + (tail_lines[-1] if tail_lines else '')
  return re.sub(r'\s+', ' ', message).strip()


def describe(error: BaseException) -> str:
  """One line naming the error: its message, or its type if it has none."""
  return one_line(str(error)) or type(error).__name__


def _describe_unknown_key(error: Exception, argv: Sequence[str]) -> str:
  """The key, the override that named it and ml_collections' suggestion.

  ml_collections raises KeyError("'lrr'\\nDid you mean \"lr\" ...?"), or an
  AttributeError wrapping one, while --config.optim.lrr=1 is parsed.
  """
  key_error = error
  if isinstance(error, AttributeError):
    key_error = next((e for e in (*error.args, error.__context__)
                      if isinstance(e, KeyError)), error)
  text = str(key_error.args[0]) if key_error.args else str(key_error)
  key, _, suggestion = text.partition('\n')
  key = key.strip('\'"')
  message = f'unknown config key {key!r}'
  override = next((arg for arg in argv if arg.startswith('--') and
                   key in arg.partition('=')[0].split('.')[1:]), None)
  if override:
    message += f' in {override}'
  if suggestion:
    message += f'. {suggestion}'
  return message


def _verbose_requested(argv: Sequence[str]) -> bool:
  """--verbose, read from argv: flags may not be parsed yet (or at all)."""
  if flags.FLAGS.is_parsed():
    return bool(flags.FLAGS[VERBOSE_FLAG].value)
  return any(arg in (f'--{VERBOSE_FLAG}', f'--{VERBOSE_FLAG}=true',
                     f'--{VERBOSE_FLAG}=1') for arg in argv)


def fail(message: str) -> NoReturn:
  """Prints `error: message` (one line) to stderr and exits with status 1."""
  sys.stdout.flush()
  sys.stderr.write(f'error: {one_line(message)}\n')
  sys.stderr.flush()
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except _FLAG_PARSING_ERRORS as error:
    if _verbose_requested(argv):
      traceback.print_exc()
    if isinstance(error, (KeyError, AttributeError)):
      fail(_describe_unknown_key(error, argv))
    if isinstance(error, flags.Error):
      fail(f'{describe(error)} (--helpshort lists the flags)')
    fail(describe(error))


def run(main: Callable[[list[str]], Any],
        argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)`, with user errors reported on one line.

  Defines --verbose (unless defined already) on the global flags; call it
  only from an `if __name__ == '__main__':` block.
  """
  if VERBOSE_FLAG not in flags.FLAGS:
    flags.DEFINE_bool(VERBOSE_FLAG, False,
                      'On an error, show the Python traceback as well.')

  def main_reporting_errors(main_argv: list[str]) -> Any:
    try:
      return main(main_argv)
    except USER_ERRORS as error:
      if flags.FLAGS[VERBOSE_FLAG].value:
        traceback.print_exc()
      fail(describe(error))
    except SystemExit as exit_request:
      if not isinstance(exit_request.code, str):
        raise  # A status (e.g. preempted: rerun to resume) passes through.
      # sys.exit('prog: error: ...') of the entry point: its message on one
      # line, and with --verbose the traceback of the error it reports.
      cause = exit_request.__cause__ or exit_request.__context__
      if flags.FLAGS[VERBOSE_FLAG].value and cause is not None:
        traceback.print_exception(cause)
      sys.stdout.flush()
      sys.stderr.write(one_line(exit_request.code) + '\n')
      sys.stderr.flush()
      sys.exit(1)

  app.run(main_reporting_errors, argv=None if argv is None else list(argv),
          flags_parser=_parse_flags)
