"""Local demo: fake upstreams on loopback so the gateway runs end to end without API keys."""
