"""A test-only ComfyUI pack.

``LiveTalkTestTinyConditioning`` stands in for the umT5 text-encoder branch, which is too big for
CI: it turns a prompt into a CONDITIONING shaped like CLIPTextEncode's with CLIPLoader type 'wan'
(``[1, L, 4096]``, one row per word), with deterministic values. ``LiveTalkTestEmptyAudio`` yields
an AUDIO with no samples (LoadAudio itself refuses empty files).
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


class LiveTalkTestEmptyAudio:
    CATEGORY = "LiveTalk/testing"
    FUNCTION = "make"
    RETURN_TYPES = ("AUDIO",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return ({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100},)


NODE_CLASS_MAPPINGS = {
    "LiveTalkTestTinyConditioning": LiveTalkTestTinyConditioning,
    "LiveTalkTestEmptyAudio": LiveTalkTestEmptyAudio,
}
