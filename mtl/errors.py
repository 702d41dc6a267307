"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad configuration or data: the message names the key, column or file and what is wrong."""
