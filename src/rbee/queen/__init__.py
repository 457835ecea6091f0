"""queen-rbee: the orchestrator."""
