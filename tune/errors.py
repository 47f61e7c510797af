"""The one exception class of the sweep CLIs' bad input (``tune.run``, ``tune.select``)."""


class UsageError(ValueError):
    """Bad command-line input: one line naming the value and what is accepted; the CLI exits 2."""
