"""`python -m daisee_node` is the `daisee-node` command."""

import sys

from daisee_node.cli import main

sys.exit(main())
