"""Old spelling of `python -m tools.eg3d_samples`, kept so existing scripts keep working (the command moved)."""
import sys

from tools.eg3d_samples import main

if __name__ == "__main__":
    sys.exit(main())
