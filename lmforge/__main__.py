"""`python -m lmforge ...`: the same command line as `lmforge ...`."""
import sys

from lmforge.cli import main

sys.exit(main())
