"""``python -m splitpoint``: the same as the ``splitpoint`` command."""

from splitpoint.app.cli import main

main()
