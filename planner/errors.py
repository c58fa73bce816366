"""The project's error types: the command line turns each into a one-line message and its exit code."""


class PlannerError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class SearchStopped(PlannerError):
    """The search ran but had to stop (every recent trial failed): not a usage problem."""

    exit_code = 1


class Interrupted(PlannerError):
    """Ctrl-C during a search, after saying what was saved."""

    exit_code = 130


def read_user_text(path, what: str, error=PlannerError) -> str:
    """A text file the user named (a recipe, a study file), or one line saying why it cannot be read."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
