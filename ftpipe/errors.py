"""One error type for problems the user can fix: the CLI prints its message (no traceback) and exits non-zero."""

from __future__ import annotations

import errno

_FULL = "free space there or point cache_dir= at a larger disk"
# OS errors the user fixes outside ftpipe: said in one line with what to do, never as a traceback
_OS_HINTS = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EACCES: "check its permissions (ftpipe reads your files and writes only under cache_dir)",
    errno.EPERM: "check its permissions (ftpipe reads your files and writes only under cache_dir)",
    errno.EROFS: "point cache_dir= at a writable disk",
}
RESUMES = "Finished stages stay cached; rerun the same command to resume"


class FtpipeError(Exception):
    pass


def os_error_line(exc: OSError) -> str | None:
    """The one line for an OS error the user can fix (space, permissions), or None for any other."""
    hint = _OS_HINTS.get(exc.errno or 0)
    if hint is None:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}; {hint}. {RESUMES}"
