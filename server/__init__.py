"""Server side: the tail worker pool, the plan registry and the orchestrator."""
