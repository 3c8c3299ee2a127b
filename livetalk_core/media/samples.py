"""The sample inputs the pack ships in ``assets/``: what the demo, the smoke runs and the live page start with."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
SAMPLE_IMAGE = ASSETS / "portrait.jpg"
SAMPLE_AUDIO = ASSETS / "speech.flac"
