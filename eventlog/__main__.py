"""`python -m eventlog`: the command line."""

from .cli import main

main()
