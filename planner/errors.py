"""The one error type the command line turns into a one-line message and exit code 2."""


class PlannerError(Exception):
    """A problem with the user's input or environment, explained in one line."""


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
