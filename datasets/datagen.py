"""Old spelling of `python -m tools.datagen`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.datagen import cli

if __name__ == "__main__":
    sys.exit(cli())
