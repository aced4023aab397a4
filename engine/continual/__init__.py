"""Staged runs and forgetting: regularisers, Fisher, forgetting metrics, the forgetting report,
branching."""
