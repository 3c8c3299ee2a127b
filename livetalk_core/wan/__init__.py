"""The shared Wan DiT core: blocks, attention, RoPE, the KV cache and fp8 linears."""
