"""LiveTalk 1.3B: Wan2.1-T2V-1.3B with OmniAvatar's audio branch, its sampler and family."""
