"""The one exception type a user ever sees: it carries a single line naming the file or field."""


class DlmcError(Exception):
    """Bad input from the user (a checkpoint, a recipe, an option). The CLI prints str(e) and exits 2."""
