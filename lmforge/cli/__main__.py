"""`python -m lmforge.cli ...` (how torchrun starts the command line on every process)."""
import sys

from lmforge.cli import main

sys.exit(main())
