"""`python -m ftpipe ...` is the `ftpipe` command."""

from .cli import main

main()
