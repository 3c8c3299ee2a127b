"""How a DiT runs: schedules, noise, the denoising loop, compile, CUDA graphs, streaming decode."""
