"""The public encoder contract: a foreign encoder joins a shard beside ours."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.embedding import EncodeRequest
from encoders.ensemble import EnsembleRule
from encoders.errors import WeightsError
from encoders.interface import Encoder, TextVariants
from encoders.modality import Modality
from encoders.model import MultimodalEncoder
from encoders.registry import loader_for
from encoders.shard import Shard
from encoders.weights import DEFAULT_PREPROCESS, config_for


class TextImageOnly:
    """A stand-in for an adapter that reads text and images only."""

    modalities = frozenset({Modality.TEXT, Modality.IMAGE})
    dim = 8

    def __init__(self) -> None:
        self.seen_strings: list[tuple[tuple[str, ...], ...]] = []

    def embed_text(self, text: TextVariants) -> torch.Tensor:
        self.seen_strings.append(text.strings)
        b, v = len(text.strings), len(text.strings[0])
        lengths = torch.tensor([[len(s) for s in row] for row in text.strings], dtype=torch.float32)
        out = torch.ones(b, v, self.dim) + lengths.unsqueeze(-1) * torch.linspace(0, 1, self.dim)
        return F.normalize(out, dim=-1)

    def embed_patches(
        self, modality: Modality, patches: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        pooled = (patches.unsqueeze(1) * keep.unsqueeze(-1)).mean(dim=2)[..., : self.dim]
        return F.normalize(pooled + 1e-3, dim=-1)


def test_our_encoder_satisfies_the_protocol() -> None:
    model = MultimodalEncoder(config_for(DEFAULT_PREPROCESS, 16, 32, 1, 2))
    assert isinstance(model, Encoder)
    assert isinstance(TextImageOnly(), Encoder)
    assert model.dim == 16 and model.modalities == frozenset(Modality)


def test_unknown_kind_is_a_weights_error() -> None:
    with pytest.raises(WeightsError, match="no encoder kind"):
        loader_for("no-such-kind")


def test_foreign_encoder_in_a_shard(shard: Shard) -> None:
    foreign = TextImageOnly()
    ours = MultimodalEncoder(config_for(DEFAULT_PREPROCESS, 8, 32, 1, 2)).eval()
    mixed = Shard(
        weights_id="test",
        preprocess=DEFAULT_PREPROCESS,
        pair_delta={},
        encoders=[ours, foreign],
        backbone=shard._backbone,
        rule=EnsembleRule(),
        mask_count=2,
        device="cpu",
    )
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, (64, 256)).astype(np.float32)
    image = rng.uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    requests = [
        EncodeRequest(Modality.TEXT, "a red circle on grey", hashlib.sha256(b"t").digest()),
        EncodeRequest(Modality.IMAGE, image, hashlib.sha256(b"i").digest()),
        EncodeRequest(Modality.AUDIO, audio, hashlib.sha256(b"a").digest()),
    ]
    text, picture, sound = mixed.embed(requests, b"beacon")
    assert foreign.seen_strings[0][0][0] == "a red circle on grey"
    assert len(foreign.seen_strings[0][0]) == 5  # the full text, then 2 masks and complements
    for item in (text, picture):
        assert all(np.isfinite(item.encoder_losses))
    assert np.isnan(sound.encoder_losses[1]) and sound.used == (True, False)
    assert abs(float(np.linalg.norm(sound.vector)) - 1.0) < 1e-5
