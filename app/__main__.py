"""``python -m splitpoint.app``: the same as the ``splitpoint`` command."""

from splitpoint.app.cli import main

main()
