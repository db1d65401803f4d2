"""The one exception type for mistakes a user can fix (a dataset name, a file, a flag, a resume).

`common.runlog.cli` prints its message alone, with no traceback, and exits with status 2. Anything
else that goes wrong is a bug or a failing machine and keeps its traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""
