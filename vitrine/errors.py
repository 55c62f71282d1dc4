"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad path, bad value or bad input file: the message names it and says what to do."""
