"""`python -m condo` is the `condo` command."""

from condo.cli import main

main()
