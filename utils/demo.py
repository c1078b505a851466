"""Old spelling of `python -m tools.demo`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
