"""``python -m splitpoint``: the same as the ``splitpoint`` command."""

from splitpoint.app.launch import main

main()
