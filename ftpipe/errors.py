"""One error type for problems the user can fix: the CLI prints its message (no traceback) and exits non-zero."""


class FtpipeError(Exception):
    pass
