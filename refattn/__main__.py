"""``python -m refattn``: the ``refattn`` command line (:func:`refattn.cli.main`), for an
environment where the console script is not on the path."""

import sys

from refattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
