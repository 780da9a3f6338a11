from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from encoders.embedding import ItemEmbedding
from encoders.fusion import cosine_distance, fuse_pair
from encoders.modality import Modality

DIM = 8
vectors = arrays(np.float64, DIM, elements=st.floats(-1, 1, allow_nan=False))
losses = st.floats(0.0, 5.0)
alphas = st.floats(0.0, 1.0)
modality_pairs = st.permutations(list(Modality)).map(lambda ms: (ms[0], ms[1]))


def item(v: np.ndarray, loss: float) -> ItemEmbedding:
    norm = np.linalg.norm(v)
    assume(norm > 1e-3)
    return ItemEmbedding(
        vector=(v / norm).astype(np.float32),
        diff_loss=loss,
        quality=float(np.exp(-loss)),
        encoder_losses=(loss,),
        used=(True,),
    )


@given(vectors, vectors, losses, losses, alphas, alphas, modality_pairs, st.floats(0.0, 2.0))
def test_fusion_invariants(
    va: np.ndarray,
    vb: np.ndarray,
    la: float,
    lb: float,
    alpha_a: float,
    alpha_b: float,
    modalities: tuple[Modality, Modality],
    delta: float,
) -> None:
    a, b = item(va, la), item(vb, lb)
    ma, mb = modalities
    alpha = {ma: alpha_a, mb: alpha_b}
    out = fuse_pair(a, b, ma, mb, alpha, delta)
    assert 0.0 <= out.distance <= 2.0
    assert out.distance == cosine_distance(a.vector, b.vector)
    assert out.too_far == (round(out.distance * 1e6) > round(delta * 1e6))  # the record's ppm
    assert (out.fused is None) == out.too_far
    swapped = fuse_pair(b, a, mb, ma, alpha, delta)
    assert swapped.distance == out.distance
    if out.fused is not None:
        assert swapped.fused is not None
        for vector in out.fused:
            assert vector.dtype == np.float32
            assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
        np.testing.assert_allclose(out.fused[0], swapped.fused[1], atol=1e-6)
        np.testing.assert_allclose(out.fused[1], swapped.fused[0], atol=1e-6)


@given(vectors, vectors, losses, losses, modality_pairs)
def test_alpha_one_returns_own_embeddings(
    va: np.ndarray, vb: np.ndarray, la: float, lb: float, modalities: tuple[Modality, Modality]
) -> None:
    a, b = item(va, la), item(vb, lb)
    ma, mb = modalities
    out = fuse_pair(a, b, ma, mb, {ma: 1.0, mb: 1.0}, delta=2.0)
    assert out.fused is not None
    np.testing.assert_allclose(out.fused[0], a.vector, atol=1e-6)
    np.testing.assert_allclose(out.fused[1], b.vector, atol=1e-6)


@given(vectors, losses)
def test_identical_pair_has_zero_distance_and_fuses_to_itself(v: np.ndarray, loss: float) -> None:
    a = item(v, loss)
    alpha = {Modality.TEXT: 0.75, Modality.IMAGE: 0.75}
    out = fuse_pair(a, a, Modality.TEXT, Modality.IMAGE, alpha, 1e-6)
    assert out.distance < 1e-6
    assert out.fused is not None
    np.testing.assert_allclose(out.fused[0], a.vector, atol=1e-6)
