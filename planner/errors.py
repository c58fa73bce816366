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


def first_line(error, limit: int | None = None) -> str:
    """The first line of an exception's (or a text's) message, for a one-line report."""
    text = (str(error).strip().splitlines() or [type(error).__name__ if isinstance(error, BaseException) else ""])[0]
    return text if limit is None else text[:limit]


def check_writable(path, what: str = "") -> None:
    """Fail before any work when a file the user named could not be written there (its folder is missing,
    is not a folder, or is read-only), or when it names a folder."""
    import os
    from pathlib import Path

    path = Path(path)
    named = f"{what} {path}".strip()
    if path.is_dir():
        raise PlannerError(f"cannot write {named}: it is a folder")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlannerError(f"cannot write {named}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PlannerError(f"cannot write {named}: folder {folder} is not writable")
