"""Rewards that are not tied to one world: learned reward models (HPS v2.1, CLIP score, PickScore,
the LAION aesthetic predictor, ImageReward, VideoAlign), a VLM judge, the binary wrapper, and the
reward service and its client.

Each module is imported on use through :data:`dancegrpo.registry.REWARDS`; importing this
package imports nothing heavy. A reward is a callable ``reward(samples, prompts) -> (B,)
float32`` with a ``name``; docs/rewards.md says where each one's weights come from and what
it computes.
"""
