"""Old spelling of `python -m tools.convert_checkpoint`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
