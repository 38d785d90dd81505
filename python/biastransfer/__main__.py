"""`python -m biastransfer ...` is the `biastransfer` command."""
import sys

from .cli import main

sys.exit(main())
