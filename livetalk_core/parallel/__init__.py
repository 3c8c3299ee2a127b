"""Sequence parallelism over several GPUs and the worker processes that run it."""
