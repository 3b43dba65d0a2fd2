"""The base class of every error whose message is meant for the user as it is.

Command lines print such an error as one line (`<prog>: error: <message>`) and exit with
code 1; anything else is a bug and keeps its traceback. Messages are one line and say
what to change.
"""


class UserError(Exception):
  """An error caused by the user's input (config, paths, data, disk); one-line message."""
