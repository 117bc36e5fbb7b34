"""`lmforge` subcommands of preference tuning and RL (see lmforge.cli.STAGE_COMMANDS)."""


def add_commands(sub) -> None:
    """Add reward / dpo / grpo / ppo subcommands to the `lmforge` parser's subparsers."""
