"""The one exception for bad user input."""


class UserError(Exception):
    """Bad input from the user. The message must say what is wrong and what to do instead."""
