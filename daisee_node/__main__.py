"""`python -m daisee_node` is the `daisee-node` command."""

import sys

from daisee_node._entry import main

sys.exit(main())
