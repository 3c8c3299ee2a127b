"""How far a live session's streaming audio features are from the offline whole-clip ones.

For each family, a clip of real speech (default: the shipped ``assets/speech.flac``) is encoded
twice with the same wav2vec2: offline, as the offline path does (LiveTalk: the whole clip at once;
RealVideo: 5 s segments), and live, block by block over each block's bounded window
(``livetalk/live.py``, ``realvideo/live.py``) for several context and look-ahead lengths. Printed per
setting: the relative L2 distance ``|live - offline| / |offline|`` of each video frame's feature
vector (median, 95th percentile, worst) over the frames the clip covers.

The wav2vec2 has random weights (none can be downloaded here) at the release sizes: wav2vec2-base
(LiveTalk) and wav2vec2-large (RealVideo), or tiny ones with ``--tiny``. Random weights are not the
trained ones, so the numbers say how much the window changes what the encoder sees, not how much
the lips move: a trained encoder's sensitivity to its context may differ.

    python benchmarks/live_features.py [--audio FILE] [--tiny] [--family livetalk|realvideo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livetalk_core.livetalk import live as livetalk_live  # noqa: E402
from livetalk_core.livetalk.audio import pad_waveform_to_blocks  # noqa: E402
from livetalk_core.livetalk.pipeline import livetalk_video_length  # noqa: E402
from livetalk_core.media.audio_file import SAMPLE_RATE, load_audio  # noqa: E402
from livetalk_core.media.samples import SAMPLE_AUDIO  # noqa: E402
from livetalk_core.media.timing import video_frames_for_latents  # noqa: E402
from livetalk_core.media.wav2vec2 import AudioEncoder, livetalk_audio_features  # noqa: E402
from livetalk_core.realvideo import live as realvideo_live  # noqa: E402
from livetalk_core.realvideo.audio import realvideo_audio_features, segment_features  # noqa: E402
from livetalk_core.runtime.live_stream import FRAME_SAMPLES, LiveWindow  # noqa: E402

CONTEXTS_S = (0.5, 1.0, 2.0, 4.0)
LOOKAHEADS_S = (0.0, 0.25)


def random_wav2vec2(large: bool, tiny: bool) -> AudioEncoder:
    """A randomly initialised wav2vec2 at the release size (base or large), or a tiny one."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    sizes = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096) if large \
        else {}
    if tiny:
        sizes = dict(hidden_size=32, num_hidden_layers=24 if large else 2, num_attention_heads=2, intermediate_size=64,
                     conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    variant = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True) if large else {}
    model = Wav2Vec2Model(Wav2Vec2Config(**sizes, **variant)).eval().requires_grad_(False)
    return AudioEncoder(model, do_normalize=True, source=Path("random"))


def window_audio(clip: torch.Tensor, start: int, end: int) -> torch.Tensor:
    audio = torch.zeros(end - start)
    lo, hi = max(start, 0), min(end, clip.numel())
    if hi > lo:
        audio[lo - start : hi - start] = clip[lo:hi]
    return audio


def distances(live: torch.Tensor, offline: torch.Tensor) -> np.ndarray:
    """Per frame ``|live - offline| / |offline|`` of ``[frames, features]``."""
    return ((live - offline).norm(dim=1) / offline.norm(dim=1).clamp_min(1e-12)).numpy()


def livetalk_frames(encoder: AudioEncoder, clip: torch.Tensor, window: LiveWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline and live LiveTalk features ``[frames, (L + 2) * hidden]`` of the clip's video frames."""
    length = livetalk_video_length(clip.numel())
    live = []
    for block in range(length.num_blocks):
        start, end = livetalk_live.block_window(block, window)
        features = livetalk_live.block_features(encoder, block, window_audio(clip, start, end), window)
        live.append(features[0, (block > 0) :])
    frames = length.num_video_frames
    return torch.cat(live)[:frames].float(), livetalk_offline(encoder, clip)[:frames]


def livetalk_offline(encoder: AudioEncoder, clip: torch.Tensor) -> torch.Tensor:
    """The offline path's features ``[frames, (L + 2) * hidden]``: the clip padded to whole blocks, at once."""
    padded, latents = pad_waveform_to_blocks(clip, 3)
    return livetalk_audio_features(encoder, padded, video_frames_for_latents(latents))[0].float()


def realvideo_offline(encoder: AudioEncoder, clip: torch.Tensor) -> torch.Tensor:
    """The offline path's features ``[frames, 25 * width]``: 5 s segments, each padded to whole seconds."""
    offline = torch.cat([f[0] for f in realvideo_audio_features(encoder, clip, torch.float32)], dim=-1)
    return offline.flatten(0, 1).T


def offline_baseline(offline, encoder: AudioEncoder, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale to read the distances against: the offline features of the clip with 1 s of silence
    appended (the same speech) against the clip's own, over the clip's frames."""
    longer = torch.cat([clip, torch.zeros(SAMPLE_RATE)])
    frames = clip.numel() // FRAME_SAMPLES
    return offline(encoder, longer)[:frames], offline(encoder, clip)[:frames]


def realvideo_frames(encoder: AudioEncoder, clip: torch.Tensor,
                     window: LiveWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline (5 s segments) and live RealVideo features ``[frames, 25 * width]`` of the clip's audio frames."""
    frames = clip.numel() // FRAME_SAMPLES
    live = []
    for block in range(-(-frames // realvideo_live.BLOCK_FRAMES)):
        start, end = realvideo_live.block_window(block, window)
        segment, ptr = realvideo_live.block_segment(block, window, window_audio(clip, start, end))
        first = ptr * realvideo_live.VIDEO_FRAMES_PER_LATENT
        features = segment_features(encoder, segment, torch.float32)[0]
        live.append(features[..., first : first + realvideo_live.BLOCK_FRAMES])
    live = torch.cat(live, dim=-1)[..., :frames].flatten(0, 1).T  # [layers, A, F] -> [F, layers * A]
    return live, realvideo_offline(encoder, clip)[:frames]


def report(name: str, measure, offline, encoder: AudioEncoder, clip: torch.Tensor) -> None:
    print(f"\n{name}: relative L2 distance per video frame, live vs offline ({clip.numel() / SAMPLE_RATE:.1f} s)")
    print("| context (s) | look-ahead (s) | median | p95 | worst |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        d = distances(*offline_baseline(offline, encoder, clip))
    print(f"| offline, 1 s of silence appended | | {np.median(d):.3f} | {np.percentile(d, 95):.3f} | {d.max():.3f} |")
    for lookahead in LOOKAHEADS_S:
        for context in CONTEXTS_S:
            window = LiveWindow(round(context * SAMPLE_RATE), round(lookahead * SAMPLE_RATE))
            with torch.no_grad():
                d = distances(*measure(encoder, clip, window))
            print(f"| {context} | {lookahead} | {np.median(d):.3f} | {np.percentile(d, 95):.3f} | {d.max():.3f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio", type=Path, default=SAMPLE_AUDIO)
    parser.add_argument("--tiny", action="store_true", help="tiny random wav2vec2s instead of the release sizes")
    parser.add_argument("--family", choices=("livetalk", "realvideo"), action="append")
    args = parser.parse_args()
    torch.set_num_threads(2)
    clip = load_audio(args.audio)
    size = "tiny" if args.tiny else "release-size"
    for family in args.family or ("livetalk", "realvideo"):
        large = family == "realvideo"
        encoder = random_wav2vec2(large, args.tiny)
        label = f"{family}, {size} random wav2vec2-{'large' if large else 'base'}"
        if family == "livetalk":
            report(label, livetalk_frames, livetalk_offline, encoder, clip)
        else:
            report(label, realvideo_frames, realvideo_offline, encoder, clip)


if __name__ == "__main__":
    main()
