"""The process and its devices, independent of tasks: distribution, sharding, XLA and host settings,
signals, hang guard, run lock, checkpoints, loggers, progress."""
