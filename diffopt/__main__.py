"""``python -m diffopt [COMMAND ...]``: the same as the ``diffopt`` command."""
import sys

from diffopt.cli import main

sys.exit(main())
