"""The one exception type a user ever sees: it carries a single line naming the file or field."""

import re

LINE_BREAKS = re.compile("[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")


class DlmcError(Exception):
    """Bad input from the user (a checkpoint, a recipe, an option). The CLI prints str(e) and exits 2."""

    def __init__(self, message: str):
        # Messages quote values from the user's files, which may hold line breaks: escape them.
        super().__init__(single_line(str(message)))


def single_line(text: str) -> str:
    """`text` with every line break written as its escape ("\\n"), as repr() would."""
    return LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


def one_line(e: Exception) -> str:
    """An unexpected exception from a library (torch.export, onnx, ...) as one line: its type and the
    first line of its message."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
