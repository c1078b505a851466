"""Old spelling of `python -m tools.evaluate`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
