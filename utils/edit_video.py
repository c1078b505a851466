"""Old spelling of `python -m tools.edit_video`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.edit_video import main

if __name__ == "__main__":
    sys.exit(main())
