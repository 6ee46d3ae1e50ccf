"""``python -m bsfind`` (and ``torchrun ... -m bsfind``) runs the CLI."""

from bsfind.cli import main

main()
