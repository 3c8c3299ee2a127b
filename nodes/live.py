"""LiveTalkLive: talk to the avatar in ComfyUI. The node opens live sessions on the loaded models and
serves them from ComfyUI's own server until Stop or ComfyUI's interrupt.

While the node runs, one client at a time (the node's panel, or any client of docs/live.md's protocol)
connects to ``/livetalk/live/ws`` on ComfyUI's port, streams speech in and gets the video back; the
socket and its messages are the standalone server's (``livetalk_core.live.server``), mounted on
ComfyUI's PromptServer by :mod:`.live_routes`. Each client gets a fresh session (KV cache) that is
closed when it stops or disconnects; the models stay loaded for the next client. A second client while
one is connected is answered "busy". Stop (the panel's "End live node" button, ``POST
/livetalk/live/stop``) ends the node normally, ComfyUI's Cancel as an interrupt; either way the
connected client's session is closed (freeing the KV cache) and its socket closed before the node returns.

The node outputs nothing: it is an output node (ComfyUI only runs graphs that end in one) whose result
is a line of text saying how many client sessions and frames it served. A session lasts as long as
people talk, so it is not recorded into an IMAGE batch, whose memory would grow with it.
"""

from __future__ import annotations

import logging
import uuid

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from ..livetalk_core.errors import InputError
from .comfy_models import Managed, keep_if_worth_it, kept_workspace, on_device, out_of_memory_advice
from .live_routes import HOST, LiveOffer
from .pack_types import CATEGORY, LiveTalkAudioEncoder, LiveTalkModel, LiveTalkVAE
from .sampling import MAX_SEED
from .tiny_decoder import TINY_DECODER_TOOLTIP, LiveTalkTinyDecoder

log = logging.getLogger(__name__)

# How often the waiting node looks at ComfyUI's interrupt flag (seconds): the Cancel button's delay.
INTERRUPT_POLL_S = 0.1
PANEL_HINT = "Press the microphone button on this node (or connect a live client to /livetalk/live/ws)."


class LiveTalkLive(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkLive",
            display_name="LiveTalk Live",
            category=CATEGORY,
            description="Talk to the portrait and watch it answer in real time. While this node runs, its panel "
            "streams your microphone (or an audio file) to the model and plays the video it makes, block after "
            "block; the avatar keeps moving while it listens. Runs until Stop (on the panel) or Cancel. "
            "Needs a GPU fast enough for real time (see the README's Live section).",
            inputs=[
                LiveTalkModel.Input("model", tooltip="The model from Load LiveTalk Model (LiveTalk 1.3B or "
                                    "RealVideo 14B on one GPU)."),
                LiveTalkVAE.Input("vae", tooltip="The VAE from Load LiveTalk Model; it decodes each block live."),
                LiveTalkAudioEncoder.Input("audio_encoder", tooltip="The wav2vec2 encoder from Load LiveTalk "
                                           "Model; it encodes the incoming speech as it arrives."),
                io.Conditioning.Input("conditioning", tooltip="The prompt, from CLIPTextEncode with a CLIPLoader "
                                      "of type 'wan'. For RealVideo 14B: the talking prompt."),
                io.Image.Input("image", tooltip="The face to animate (the first image of a batch), e.g. from Load "
                               "Image. It is shown at once when a client connects."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16,
                             tooltip="Video width in pixels, as in Encode Reference (VAE). Smaller is faster."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16,
                             tooltip="Video height in pixels, as in Encode Reference (VAE)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the sampling noise of each session."),
                io.Int.Input("steps", default=4, min=1, max=50,
                             tooltip="Denoising steps per block: fewer is faster. LiveTalk 1.3B is distilled for 4; "
                             "RealVideo 14B takes 2 (real time on one H100) or 4."),
                io.Conditioning.Input("idle_conditioning", optional=True,
                                      tooltip="RealVideo 14B: the idle prompt used while nobody speaks (upstream's "
                                      "live app does the same). Not connected: the talking prompt throughout. "
                                      "LiveTalk 1.3B ignores it."),
                LiveTalkTinyDecoder.Input("tiny_decoder", optional=True, tooltip=TINY_DECODER_TOOLTIP),
            ],
            outputs=[],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs) -> str:
        """Never cached: every queued prompt opens a new live session."""
        return uuid.uuid4().hex

    @classmethod
    @out_of_memory_advice
    def execute(cls, model: Managed, vae: Managed, audio_encoder: Managed, conditioning, image: torch.Tensor,
                width: int, height: int, seed: int, steps: int, idle_conditioning=None,
                tiny_decoder: Managed | None = None) -> io.NodeOutput:
        from ..livetalk_core.live.session import WarmSessions, open_session  # loaded only when a node runs

        check_inputs(model, image)
        dit, vae_engine, encoder, *tiny = on_device(model, vae, audio_encoder, *filter(None, [tiny_decoder]))

        @torch.inference_mode()
        def open_on(workspace, start=None):
            session = open_session(model.family, dit=dit, vae=vae_engine, audio_encoder=encoder, text=conditioning,
                                   idle_text=idle_conditioning, reference_image=image[0, ..., :3], width=width,
                                   height=height, seed=seed, steps=steps, device=mm.get_torch_device(),
                                   decoder=tiny[0] if tiny else None, workspace=workspace)
            return InferenceModeSession(session)

        # The clients' sessions share the DiT's kept workspace (one KV cache and its CUDA graphs, as the
        # sampler's prompts do): a live prompt queued again starts on warm graphs. When the node ends it
        # is kept only where that pays and fits (keep_if_worth_it), else freed.
        sessions = WarmSessions(open_on, workspace=kept_workspace(model))
        offer = LiveOffer(open_session=sessions, node_id=cls.hidden.unique_id, family=model.family.name)
        log.info("LiveTalk Live: serving at /livetalk/live/ws. %s", PANEL_HINT)
        try:
            with HOST.offering(offer):
                interrupted = _wait_for_stop(offer)
        finally:
            keep_if_worth_it(model)
        summary = offer.summary
        if interrupted:
            log.info("LiveTalk Live: cancelled after %s", summary.text())
            mm.throw_exception_if_processing_interrupted()
        return io.NodeOutput(ui=ui.PreviewText(f"Live session ended (Stop): {summary.text()}"))


def check_inputs(model: Managed, image: torch.Tensor) -> None:
    """Refuse what a live session cannot use before anything loads: it needs a reference image. (A model
    loaded with gpus > 1 streams its blocks from its worker processes: docs/live.md, "Several GPUs".)"""
    if image.ndim != 4 or image.shape[0] < 1:
        raise InputError("The image input holds no image. Connect a Load Image node with the face to animate.")


class InferenceModeSession:
    """A live session whose work runs under ``torch.inference_mode()`` in whichever thread calls it.

    ComfyUI runs nodes in inference mode, so the models and inputs the graph hands over are inference
    tensors; outside inference mode even a view of one fails ("Inference tensors do not track version
    counter"). The session is opened in a server worker thread and its blocks are made in the clock's
    thread, where that mode is off (it is per thread): each call turns it on. Everything else is the
    session's own."""

    def __init__(self, session) -> None:
        self._session = session

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    @torch.inference_mode()
    def next_block(self, **options):
        return self._session.next_block(**options)

    @torch.inference_mode()
    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> InferenceModeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_for_stop(offer: LiveOffer) -> bool:
    """Block until Stop (returns False) or ComfyUI's interrupt (returns True). ``offer.stop`` is set by
    the route handlers from the server's thread; the interrupt flag is read without clearing it, so
    the caller raises ComfyUI's own interrupt exception."""
    while not offer.stop.wait(INTERRUPT_POLL_S):
        if mm.processing_interrupted():
            return True
    return False

