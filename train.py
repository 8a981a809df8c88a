"""The training command line from a checkout: ``python train.py [overrides]`` (installed: ``popstack-train``).
Everything is in ``popstack.commands.train``; ``python train.py --help`` lists the forms."""

import sys

from popstack.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
