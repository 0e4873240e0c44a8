"""The one error type for user mistakes: the CLI prints its message (no traceback) and exits 2."""


class UserError(Exception):
    """Bad input from the user: a file, field, row or argument. The message must name which."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """A location prefix for error messages: `file.jsonl:12: field 'x'`."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f": field '{field}'"
    return text
