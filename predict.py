"""The inference command line from a checkout: ``python predict.py RUN_DIR RAW_DIR --out FILE``
(installed: ``popstack-predict``). Everything is in ``popstack.commands.predict``."""

import sys

from popstack.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
