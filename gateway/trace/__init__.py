"""trace: one structured event per call, written off the request path."""
