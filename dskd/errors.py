"""The one exception type users see.

Every check on user input (config keys, paths, data files, model shapes) raises
``DskdError`` with a message that names the offending field or file and says how to
fix it. The CLI prints it as one line and exits with status 2, before any output
folder is touched.
"""


class DskdError(Exception):
    """A problem with the user's input, reported as one actionable message."""
