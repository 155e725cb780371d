"""Distributed set-up, sharding, the training loop and the stage commands."""
