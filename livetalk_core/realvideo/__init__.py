"""RealVideo 14B: Wan2.2-S2V-14B with Self-Forcing, its checkpoints, sampler and family."""
