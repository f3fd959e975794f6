"""``python -m declens`` (and ``torchrun ... -m declens``) runs the command line."""

from .cli import main

main()
