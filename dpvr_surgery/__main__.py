"""`python -m dpvr_surgery` runs the command line."""

from .cli import main

main()
