"""Every node the pack registers, in menu order."""

from .encoders import LiveTalkEncodeAudioWav2Vec, LiveTalkEncodeReferenceVAE
from .live import LiveTalkLive
from .loader import LoadLiveTalkModel
from .sampling import LiveTalkCausalDiTSampler, LiveTalkDecodeBlocks
from .save_video import LiveTalkDecodeToVideoFile
from .tiny_decoder import LoadLiveTalkTinyDecoder

NODES = (
    LoadLiveTalkModel,
    LoadLiveTalkTinyDecoder,
    LiveTalkEncodeAudioWav2Vec,
    LiveTalkEncodeReferenceVAE,
    LiveTalkCausalDiTSampler,
    LiveTalkDecodeBlocks,
    LiveTalkDecodeToVideoFile,
    LiveTalkLive,
)
