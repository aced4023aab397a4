"""Assembling the train step (one place for train, compile and bench) and running it."""
