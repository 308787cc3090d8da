"""Rewards that are not tied to one world: learned reward models, wrappers and the reward service."""
