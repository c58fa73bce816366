"""The one error type the command line turns into a one-line message and exit code 2."""


class PlannerError(Exception):
    """A problem with the user's input or environment, explained in one line."""
