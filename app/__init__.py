"""Layer 5, the application: the ``splitpoint`` CLI, the demo, the bench and the orchestrator.

The only code that imports every layer below it; nothing imports it.
"""
