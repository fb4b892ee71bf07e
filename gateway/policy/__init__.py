"""Rule files: load (YAML -> specs), compile (CEL, indexes) and decide."""
