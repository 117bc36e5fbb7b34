"""`lmforge` subcommands of this stage (see lmforge.cli.STAGE_COMMANDS)."""


def add_commands(sub) -> None:
    """Add this stage's subcommands to the `lmforge` parser's subparsers."""
