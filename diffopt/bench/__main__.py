"""``python -m diffopt.bench [options]``: the same as ``diffopt bench [options]``."""
import sys

from diffopt.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
