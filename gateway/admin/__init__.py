"""admin: the second listener (never the agents' port): approvals, health, and later the console."""
