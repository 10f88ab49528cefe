"""``python -m studio.training run.toml [--resume] [--no-bar]`` (also the module ``accelerate launch`` runs)."""
import sys

from .runner import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
