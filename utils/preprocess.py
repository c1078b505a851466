"""Old spelling of `python -m tools.preprocess`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
