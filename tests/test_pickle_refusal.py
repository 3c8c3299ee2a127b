"""A torch pickle that holds more than tensors is refused, and the refusal never advises loading it
unsafely (torch's own message suggests ``weights_only=False``)."""

from __future__ import annotations

import pytest
import torch

from livetalk_core.errors import CheckpointError
from livetalk_core.media.checkpoint import read_state_dict


class RunsCodeWhenLoaded:
    def __reduce__(self):
        return (print, ("this must never run",))


class PlainObject:
    pass


@pytest.mark.parametrize("payload, named", [(RunsCodeWhenLoaded(), "print"), (PlainObject(), "PlainObject")])
@pytest.mark.parametrize("zip_format", [True, False])
def test_refusal_says_why_and_what_to_use_instead(tmp_path, capsys, payload, named, zip_format):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "extra": payload}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as refusal:
        read_state_dict(path, what="DiT")
    message = str(refusal.value)
    assert "weights_only" not in message and "trust" not in message
    assert str(path) in message and "could run code" in message and named in message
    assert ".safetensors" in message and "original release file" in message
    assert "this must never run" not in capsys.readouterr().out
