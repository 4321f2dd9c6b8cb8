"""``python -m splitpoint.app``: the same as the ``splitpoint`` command."""

from splitpoint.app.launch import main

main()
