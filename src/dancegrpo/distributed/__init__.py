"""Running one job over many processes: torchrun launch, data / fully-sharded parallel updates,
sequence-parallel attention and sharded checkpoints (docs/distributed.md).

Nothing here is imported by ``import dancegrpo``: a single-process run never touches
``torch.distributed``.
"""
