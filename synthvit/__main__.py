"""``python -m synthvit`` (and ``accelerate launch -m synthvit``)."""
import sys

from synthvit.cli import main

if __name__ == "__main__":
    sys.exit(main())
