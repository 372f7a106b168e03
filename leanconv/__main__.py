"""`python -m leanconv` (and `torchrun -m leanconv`) runs the command line."""
import sys

from leanconv.cli import main

sys.exit(main())
