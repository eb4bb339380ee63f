"""``python -m synthvit`` (and ``accelerate launch -m synthvit``).

``python -m`` puts the working directory first on ``sys.path``: a user's own ``generate.py``, ``models/`` or
``compare/`` there would shadow the stages. As pip's ``__main__`` does, drop it before importing anything of ours.
"""
import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    sys.path.pop(0)

from synthvit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
