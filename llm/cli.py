"""The command-line contract every `main` shares: a user's mistake costs one line, not a traceback.

  llm.cli.run(main)   instead of absl's app.run(main)

A mistaken flag or config value, a missing file, a busy workdir: the command
prints `NAME: error: <one sentence>` on stderr and exits with status 2 (the
flags could not be read) or 1 (a value or a file is wrong). Other exceptions
are bugs, and keep their tracebacks. `--verbose` keeps the traceback for
every error, for when the sentence is not enough.

The sentence is the exception's own: errors raised in this project name the
field to change and what is valid. Errors raised while absl and
ml_collections read the flags (a misspelt `--config.KEY`, a config file that
is missing or fails to load) are cut down here to their last line.
"""

import os
import re
import sys

from absl import app, flags

# Raised for input the user can fix. (OSError covers missing, unreadable and busy paths.)
USER_ERRORS = (ValueError, OSError, FloatingPointError, app.UsageError)


def one_line(error: BaseException) -> str:
  """`error` as one line: its type and message, whitespace collapsed."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  message = ' '.join(str(message).split())
  name = type(error).__name__
  return message if name in ('UsageError', 'Error', 'ValueError') else f'{name}: {message}'


def fail(message: str, status: int = 1):
  """Prints `message` as the command's one error line and exits with `status`."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  program = spec.name.removesuffix('.__main__') if spec else 'llm'
  print(f'{program}: error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Not SystemExit: background threads of a failed read (orbax, TensorStore) would
  # print their own tracebacks at interpreter shutdown, burying the sentence. What
  # must be saved is saved before the error reaches here (train's finally blocks).
  os._exit(status)


def check_positive(*names: str) -> None:
  """Stops on an integer flag that must be positive, before any work is done."""
  for name in names:
    value = flags.FLAGS[name].value
    if value <= 0:
      raise ValueError(f'--{name}={value} must be positive.')


def _flag_error(error: Exception, argv: list[str]) -> str:
  """The sentence to show for an error raised while the flags are parsed."""
  text = str(error.args[0] if isinstance(error, (KeyError, AttributeError)) else error)
  if isinstance(error, (KeyError, AttributeError)):
    # ml_collections: "'totl_steps'\nDid you mean "total_steps" instead of "totl_steps"?"
    key = text.split('\n')[0].strip('\'"')
    flag = next((a.split('=')[0] for a in argv if a.split('=')[0].endswith('.' + key)), key)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    suggestion = f'; did you mean {hint.group(1)!r}?' if hint else '.'
    return f'{flag} names no config key {key!r}{suggestion}'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  lines = [line for line in lines if not line.startswith('Pass --help')]
  if 'No such file or directory' in text or 'Errno' in text:
    path = re.search(r'flag (--[\w.]+)=(\S+?):', text)
    if path:
      return f'{path.group(1)}={path.group(2)}: no such file.'
  if 'Error whilst parsing config file' in text and lines:
    flag = re.search(r'flag (--[\w.]+=\S+?):', text)
    where = f'{flag.group(1)}: ' if flag else ''
    return where + lines[-1]
  return ' '.join(lines) or type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every parse error cut to one sentence."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(e, argv), 2)
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    fail(_flag_error(e, argv), 2)


def run(main) -> None:
  """absl's `app.run(main)`, failing on user errors in one line (see the module docstring)."""
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, 'Show the traceback of every error, not one line.')

  def guarded(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.verbose:
        raise
      fail(one_line(e), 2 if isinstance(e, app.UsageError) else 1)

  app.run(guarded, flags_parser=parse_flags)
