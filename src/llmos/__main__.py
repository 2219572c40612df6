"""``python -m llmos`` runs the CLI."""

from llmos.cli import main

main()
