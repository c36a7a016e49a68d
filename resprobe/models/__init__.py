"""Models: MODEL specs, safe checkpoint loading, the hub, block discovery, per-class family knowledge, the zoo."""
