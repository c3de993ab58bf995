"""Errors caused by the user's input: the CLI prints them as one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (config, data, model path, budget); the message names what is wrong."""
