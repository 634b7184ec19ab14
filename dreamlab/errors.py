"""One exception type whose message is a complete, one-line instruction for the user."""


class DreamlabError(Exception):
    """An error caused by input (a name, a value, a file, a missing package).

    The message names the bad thing and the fix; the CLI prints it on one line and exits with code 2.
    """
