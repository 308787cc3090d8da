"""Learned rewards: reward models loaded from local checkpoints, registered in ``dancegrpo.registry``."""
