"""A test-only ComfyUI pack: stands in for the umT5 text-encoder branch, which is too big for CI.

``LiveTalkTestTinyConditioning`` turns a prompt into a CONDITIONING shaped like CLIPTextEncode's
with CLIPLoader type 'wan' (``[1, L, 4096]``, one row per word), with deterministic values.
"""

import zlib

import torch


class LiveTalkTestTinyConditioning:
    CATEGORY = "LiveTalk/testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True, "tooltip": "The prompt."})}}

    def encode(self, text):
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        tokens = max(1, len(text.split()))
        return ([[torch.randn(1, tokens, 4096, generator=generator), {}]],)


NODE_CLASS_MAPPINGS = {"LiveTalkTestTinyConditioning": LiveTalkTestTinyConditioning}
