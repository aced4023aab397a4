"""Commands beside training: compile (aot), bench, preflight, eval and export."""
