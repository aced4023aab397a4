"""The run config: its schema (pydantic sections), loading with overrides, and its resolution into
tasks and stages."""
