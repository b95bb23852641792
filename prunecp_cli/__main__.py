"""``python -m prunecp_cli`` (and ``torchrun -m prunecp_cli``) runs the CLI."""

from prunecp_cli.app import main

main()
