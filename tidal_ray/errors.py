"""What a user did wrong (exit 2), told apart from what went wrong inside (exit 1).

A small module every layer may import: checks raise ``BadInput`` where they look at the
input, and ``cli.main`` maps it to exit code 2. Any other exception, a ``ValueError``
from inside NumPy, PyTorch, pyarrow or Ray included, is an internal error (exit 1).
"""


class BadInput(ValueError):
    """Bad usage or bad input, said in one line that names the culprit: exit code 2."""


class NothingToSelect(BadInput):
    """Every row of the pool is excluded (labeled, skipped, selected) or rejected: a
    selection has nothing to pick from. A campaign ends there instead of failing."""


class Refused(RuntimeError):
    """An expected condition that stops the command, said plainly without a traceback
    hint (exit 1): e.g. a campaign that another driver holds."""
