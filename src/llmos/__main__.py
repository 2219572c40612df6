"""``python -m llmos`` runs the CLI."""

from llmos.cli import main

if __name__ == "__main__":  # not when multiprocessing re-imports the main module in a child
    main()
