"""agent-gateway: a sidecar policy-enforcement gateway for AI agents."""

__version__ = "0.1.0"
