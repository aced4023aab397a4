"""What a task computes and how it is scored: losses, metrics, evaluation."""
