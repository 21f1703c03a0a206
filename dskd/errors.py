"""The one exception type users see.

Every check on user input (config keys, paths, data files, model shapes) raises
``DskdError`` with a message that names the offending field or file and says how to
fix it. The CLI prints it as one line and exits with status 2, before any output
folder is touched.

``RankError`` is the same kind of message for a problem only one rank meets (the master's
port taken): that rank exits 1, not 2, so that the launchers take the other ranks down
instead of leaving them to wait for it.
"""


class DskdError(Exception):
    """A problem with the user's input, reported as one actionable message."""


class RankError(DskdError):
    """A problem of this rank's environment that the other ranks do not see."""
