"""The one exception type for mistakes a user can fix.

The CLI catches it once and prints its message as a single line with exit code 2;
anything else is a bug and keeps its traceback.
"""


class RankoptError(Exception):
    """A problem in the user's input: the message names it and says how to fix it."""


class TrainingDiverged(RankoptError):
    """The loss became NaN or infinite; the run cannot go on."""
