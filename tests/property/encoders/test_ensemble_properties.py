"""The batched ensemble is the per-item rule of DESIGN §4, item by item."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from encoders.embedding import ItemEmbedding
from encoders.ensemble import ROUNDING, EnsembleRule, combine_batch
from encoders.errors import EncodingFailedError


def reference_combine(
    embeddings: npt.NDArray[np.float64], losses: npt.NDArray[np.float64], rule: EnsembleRule
) -> ItemEmbedding:
    """One item, written out as the module's docstring states the rule."""
    finite = np.all(np.isfinite(embeddings), axis=1) & np.isfinite(losses)
    if not finite.any():
        raise EncodingFailedError("no finite encoder")
    used = finite.copy()
    if int(finite.sum()) >= 3:
        median = np.median(embeddings[finite], axis=0)
        norm = float(np.linalg.norm(median))
        if norm > 0.0:
            with np.errstate(divide="ignore", invalid="ignore"):
                unit = embeddings[finite] / np.linalg.norm(
                    embeddings[finite], axis=1, keepdims=True
                )
                # within the bound's slack for rounding: an encoder equal to the
                # median is at distance 0 whichever order its sum is taken in
                distance = 1.0 - (unit * (median / norm)).sum(axis=1)
                inliers = distance <= rule.outlier_distance + ROUNDING
            if inliers.any():
                used[np.flatnonzero(finite)] = inliers
    kept = losses[used]
    weights = np.exp(-(kept - kept.min()) / rule.tau)
    weights /= weights.sum()
    mixed = weights @ embeddings[used]
    norm = float(np.linalg.norm(mixed))
    if not norm > 1e-12:
        mixed, norm = embeddings[used][int(np.argmax(weights))], 1.0
    diff_loss = float(weights @ kept)
    return ItemEmbedding(
        vector=(mixed / norm).astype(np.float32),
        diff_loss=diff_loss,
        quality=float(np.exp(-diff_loss / rule.tau)),
        encoder_losses=tuple(
            float(x) if ok else float("nan") for x, ok in zip(losses, finite, strict=True)
        ),
        used=tuple(bool(x) for x in used),
    )


@st.composite
def shard_outputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    j = draw(st.integers(1, 5))
    b = draw(st.integers(1, 6))
    d = draw(st.integers(2, 6))
    values = st.floats(-1.0, 1.0, allow_nan=False, width=64)
    embeddings = draw(arrays(np.float64, (j, b, d), elements=values))
    losses = draw(arrays(np.float64, (j, b), elements=st.floats(0.0, 5.0)))
    for _ in range(draw(st.integers(0, 3))):  # degenerate encoders, zero vectors, copies
        jj, bb = draw(st.integers(0, j - 1)), draw(st.integers(0, b - 1))
        kind = draw(st.sampled_from(["nan_vector", "inf_loss", "zero", "copy"]))
        if kind == "nan_vector":
            embeddings[jj, bb, 0] = np.nan
        elif kind == "inf_loss":
            losses[jj, bb] = np.inf
        elif kind == "zero":
            embeddings[jj, bb] = 0.0
        else:
            embeddings[:, bb] = embeddings[jj, bb]
    return embeddings, losses


_X = 0.8194580597831322
"""Two encoders equal to the median and one off it, at bound 0: the distance of the
equal ones summed one way is 0, another way 1.1e-16 (found by hypothesis)."""


@given(shard_outputs(), st.floats(0.05, 5.0), st.floats(0.0, 2.0))
@example(
    (
        np.array([[[0.0, _X, _X, _X]], [[_X, _X, _X, _X]], [[_X, _X, _X, _X]]]),
        np.zeros((3, 1)),
    ),
    1.0,
    0.0,
)
def test_batch_equals_the_rule_item_by_item(
    outputs: tuple[np.ndarray, np.ndarray], tau: float, bound: float
) -> None:
    embeddings, losses = outputs
    rule = EnsembleRule(tau=tau, outlier_distance=bound)
    expected: list[ItemEmbedding | None] = []
    for i in range(embeddings.shape[1]):
        try:
            expected.append(reference_combine(embeddings[:, i], losses[:, i], rule))
        except EncodingFailedError:
            expected.append(None)
    if any(e is None for e in expected):
        with pytest.raises(EncodingFailedError, match="non-finite output for item"):
            combine_batch(embeddings, losses, rule)
        return
    got = combine_batch(embeddings, losses, rule)
    for a, e in zip(got, expected, strict=True):
        assert e is not None
        assert a.used == e.used
        np.testing.assert_array_equal(np.isnan(a.encoder_losses), np.isnan(e.encoder_losses))
        np.testing.assert_allclose(a.vector, e.vector, atol=1e-6)
        assert a.diff_loss == pytest.approx(e.diff_loss, rel=1e-12, abs=1e-12)
        assert a.quality == pytest.approx(e.quality, rel=1e-12)


def test_one_failed_item_names_itself() -> None:
    embeddings = np.ones((2, 3, 4))
    embeddings[:, 1] = np.nan
    with pytest.raises(EncodingFailedError, match=r"item\(s\) \[1\]"):
        combine_batch(embeddings, np.zeros((2, 3)), EnsembleRule())


@given(shard_outputs())
def test_an_item_s_result_does_not_depend_on_its_batch(
    outputs: tuple[np.ndarray, np.ndarray],
) -> None:
    """Validators batch different items together; each item's ensemble is the
    same bit for bit whatever else its batch holds."""
    embeddings, losses = outputs
    finite = np.all(np.isfinite(embeddings), axis=2) & np.isfinite(losses)
    keep = finite.any(axis=0)
    embeddings, losses = embeddings[:, keep], losses[:, keep]
    together = combine_batch(embeddings, losses, EnsembleRule())
    for i, item in enumerate(together):
        (alone,) = combine_batch(embeddings[:, i : i + 1], losses[:, i : i + 1], EnsembleRule())
        np.testing.assert_array_equal(alone.vector, item.vector)
        assert alone.diff_loss == item.diff_loss
        assert alone.used == item.used
