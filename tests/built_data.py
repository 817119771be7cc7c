"""Reading back a prepared data set in tests (DiffusionDB, image folders)."""

from absl import flags

from reverse_sd.data import build


def run_cli(argv):
  """Runs `python -m reverse_sd.data.build ARGV...` in this process."""
  try:
    build.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()


def rows(builder, split):
  source = builder.as_data_source(split)
  return source.__getitems__(list(range(len(source))))


def text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def ids_by_split(builder):
  return {split: [text(row['id']) for row in rows(builder, split)]
          for split in builder.info.splits}
