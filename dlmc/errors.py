"""The one exception type a user ever sees: it carries a single line naming the file or field."""


class DlmcError(Exception):
    """Bad input from the user (a checkpoint, a recipe, an option). The CLI prints str(e) and exits 2."""


def one_line(e: Exception) -> str:
    """An unexpected exception from a library (torch.export, onnx, ...) as one line: its type and the
    first line of its message."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
