"""A shard: the encoders a validator runs together, and their ensemble.

``Shard.embed`` is the pure, synchronous step ``decoded items → embeddings``;
the node calls it from a worker thread. All same-modality items of a call go
through each encoder in one forward pass that holds, per item, the full input
and every mask and complement, so the differential loss costs one pass.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from encoders.caption import CaptionDataError, check_caption_data, read_caption
from encoders.channels import Memo
from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.ensemble import EnsembleRule, combine_batch
from encoders.errors import WeightsError
from encoders.interface import Encoder, EncoderSpec, TextVariants
from encoders.masks import MASK_SHARES, batch_token_masks
from encoders.media import DecodedMedia, PreprocessSpec
from encoders.modality import Modality
from encoders.model import EncoderConfig, MultimodalEncoder
from encoders.patches import audio_patches, image_patches, video_tubelets
from encoders.registry import loader_for
from encoders.text_backbone import TextBackbone, TextTokens
from encoders.weights import UNCALIBRATED_SCORING, ScoringCalibration, read_manifest

__all__ = ["EncodeRequest", "ItemEmbedding", "Shard", "load_poc_encoder"]

_PATCHIFY = {
    Modality.IMAGE: image_patches,
    Modality.VIDEO: video_tubelets,
    Modality.AUDIO: audio_patches,
}


class Shard:
    """Verified encoders sharing one text backbone, ready to embed batches."""

    def __init__(
        self,
        *,
        weights_id: str,
        preprocess: PreprocessSpec,
        pair_delta: Mapping[frozenset[Modality], float],
        encoders: Sequence[Encoder],
        backbone: TextBackbone,
        rule: EnsembleRule,
        mask_count: int,
        device: str,
        scoring: ScoringCalibration = UNCALIBRATED_SCORING,
        genesis: Path | None = None,
    ) -> None:
        if mask_count < 1:
            raise ValueError(f"mask_count={mask_count} must be at least 1")
        if not encoders:
            raise ValueError("a shard needs at least one encoder")
        self.dim = encoders[0].dim
        if any(encoder.dim != self.dim for encoder in encoders):
            raise WeightsError(
                f"the encoders of a shard must share one dim, not {[e.dim for e in encoders]}"
            )
        self.weights_id = weights_id
        self.preprocess = preprocess
        self.pair_delta = dict(pair_delta)
        self.scoring = scoring
        self.genesis = genesis
        self._encoders = tuple(encoders)
        self._backbone = backbone
        self._rule = rule
        self._mask_count = mask_count
        self._device = device

    @property
    def modalities(self) -> frozenset[Modality]:
        """The modalities some encoder of the shard reads (a CLIP shard: text and image)."""
        return frozenset().union(*(encoder.modalities for encoder in self._encoders))

    @classmethod
    def load(
        cls,
        manifest_path: Path,
        manifest_sha256: str,
        *,
        device: str = "cpu",
        tau: float = 1.0,
        mask_count: int = 4,
    ) -> Shard:
        """Verify every pinned file (the caption look-alikes too), then build the encoders
        from safetensors."""
        manifest = read_manifest(manifest_path, manifest_sha256)
        try:
            check_caption_data()  # read captions alike, from the first one on
        except CaptionDataError as error:
            raise WeightsError(str(error)) from None
        encoders = []
        for entry in manifest.encoders:
            spec = EncoderSpec(entry.kind, entry.path, entry.config, manifest.files, device)
            encoder = loader_for(entry.kind)(spec)
            if encoder.dim != manifest.dim:
                raise WeightsError(
                    f"{entry.path} gives dim {encoder.dim}, manifest says {manifest.dim}"
                )
            encoders.append(encoder)
        backbone = TextBackbone(manifest.backbone_dir, manifest.preprocess.text_max_tokens, device)
        return cls(
            weights_id=manifest.sha256,
            preprocess=manifest.preprocess,
            pair_delta=manifest.pair_delta,
            encoders=encoders,
            backbone=backbone,
            rule=EnsembleRule(tau=tau),
            mask_count=mask_count,
            device=device,
            scoring=manifest.scoring,
            genesis=manifest.genesis,
        )

    def delta(self, a: Modality, b: Modality) -> float:
        """The pair's cosine-distance bound δ; same-modality pairs have none."""
        if a is b:
            raise ValueError(f"no pair bound for two {a} items")
        return self.pair_delta[frozenset((a, b))]

    def input_length(self, request: EncodeRequest) -> int:
        """How long the item's input is in a forward pass: a caption's wordpieces (a
        batch of captions is padded to its longest, so like lengths batch cheaply);
        0 for pictures, sounds and clips, whose inputs all have one shape."""
        if request.modality is Modality.TEXT:
            return self._backbone.length(_text(request))
        return 0

    def warm_up(self, items: int = 2) -> list[Modality]:
        """Embed a small batch of blank items of every modality the shard reads, once.

        A process's first forward passes cost more than later ones (torch and
        oneDNN allocate and build their kernels on first use: on CPU about
        60-80 ms for the first batch and 10-40 ms for each modality's first),
        so a node that warms up answers its first submissions as fast as the
        rest. The items are blank (an empty caption, a black picture, a
        silent spectrogram, a still black clip) and the results are dropped:
        the shard is a pure function, nothing is left behind. Returns the
        modalities warmed, in order.
        """
        spec = self.preprocess
        blanks: dict[Modality, DecodedMedia] = {
            Modality.TEXT: "",
            Modality.IMAGE: np.full((3, spec.image_size, spec.image_size), -1.0, np.float32),
            Modality.AUDIO: np.full((spec.n_mels, spec.audio_frames), -1.0, np.float32),
            Modality.VIDEO: np.full(
                (spec.video_frames, 3, spec.video_size, spec.video_size), -1.0, np.float32
            ),
        }
        warmed = [modality for modality in Modality if modality in self.modalities]
        for modality in warmed:
            digest = hashlib.sha256(b"warm-up " + modality.value.encode()).digest()
            request = EncodeRequest(modality, blanks[modality], digest)
            self.embed([request] * items, b"warm-up")
        return warmed

    def embed(self, requests: Sequence[EncodeRequest], epoch_beacon: bytes) -> list[ItemEmbedding]:
        """Embed decoded items, in request order, with their differential losses."""
        groups: dict[Modality, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.modality].append(index)
        results: dict[int, ItemEmbedding] = {}
        with torch.inference_mode():
            for modality, indices in groups.items():
                batch = [requests[i] for i in indices]
                variants = self._variants(modality, batch, epoch_beacon)
                losses = _differential_losses(variants)
                combined = combine_batch(variants[:, :, 0], losses, self._rule)
                results.update(zip(indices, combined, strict=True))
        return [results[i] for i in range(len(requests))]

    def _variants(
        self, modality: Modality, batch: list[EncodeRequest], epoch_beacon: bytes
    ) -> npt.NDArray[np.float64]:
        """Embeddings ``[J, B, 1+2K, D]``: full input, then each mask and its complement."""
        share = MASK_SHARES[modality]
        if modality is Modality.TEXT:
            texts = tuple(_text(r) for r in batch)
            tokens = self._backbone.tokenize(list(texts))
            # A caption's masks are seeded by the caption as read (``encoders.caption``),
            # not by its bytes: copies that differ only in marks the reading drops get
            # the same masks, so the same embedding (DESIGN.md §4's data_sha256, for text).
            seeds = [hashlib.sha256(text.encode()).digest() for text in texts]
            masks = batch_token_masks(tokens.n_tokens, share, epoch_beacon, seeds, self._mask_count)
            keep = self._backbone.keep_variants(tokens, torch.from_numpy(masks))
            variants = TextVariants(
                texts,
                lambda: self._backbone.sentence_features(tokens, keep),
                lambda: _variant_strings(self._backbone, tokens, keep),
            )
            shape = (len(batch), keep.shape[1], self.dim)
            outputs = [
                encoder.embed_text(variants)
                if modality in encoder.modalities
                else torch.full(shape, float("nan"))
                for encoder in self._encoders
            ]
        else:
            arrays = np.stack([_array(r) for r in batch])
            patches = _PATCHIFY[modality](torch.from_numpy(arrays)).to(self._device)
            masks = batch_token_masks(
                [patches.shape[1]] * len(batch),
                share,
                epoch_beacon,
                _hashes(batch),
                self._mask_count,
            )
            keep = variant_keeps(torch.from_numpy(masks)).to(self._device)
            shape = (len(batch), keep.shape[1], self.dim)
            memo: Memo = {}  # our encoders compute the parameter-free channels once
            outputs = [
                (
                    encoder.encode_patches(modality, patches, keep, memo)
                    if isinstance(encoder, MultimodalEncoder)
                    else encoder.embed_patches(modality, patches, keep)
                )
                if modality in encoder.modalities
                else torch.full(shape, float("nan"))
                for encoder in self._encoders
            ]
        stacked: npt.NDArray[np.float64] = (
            torch.stack([output.cpu() for output in outputs]).double().numpy()
        )
        return stacked


def load_poc_encoder(spec: EncoderSpec) -> MultimodalEncoder:
    """Loader of kind ``"poc"``: a ``MultimodalEncoder`` from its safetensors file."""
    try:
        model = MultimodalEncoder(EncoderConfig(**spec.config))
        tensors = load_file(str(spec.path))
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (SafetensorError, RuntimeError, OSError, TypeError) as exc:
        raise WeightsError(f"weight file {spec.path} does not fit its config: {exc}") from exc
    model.requires_grad_(False)
    return model.eval().to(spec.device)


def _variant_strings(
    backbone: TextBackbone, tokens: TextTokens, keep: torch.Tensor
) -> tuple[tuple[str, ...], ...]:
    """Each variant's kept wordpieces, detokenized (``[CLS]``/``[SEP]`` dropped)."""
    out = []
    for i in range(keep.shape[0]):
        ids = tokens.input_ids[i]
        content = torch.zeros_like(tokens.attention[i])
        content[1 : 1 + tokens.n_tokens[i]] = True
        out.append(
            tuple(
                str(backbone.tokenizer.decode(ids[keep[i, v] & content].tolist()))
                for v in range(keep.shape[1])
            )
        )
    return tuple(out)


def _differential_losses(variants: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``L_j(x) = mean_k ‖E(x) - E(x|m_k) - E(x|¬m_k)‖²``, shape ``[J, B]``."""
    full = variants[:, :, :1]
    residual = full - variants[:, :, 1::2] - variants[:, :, 2::2]
    losses: npt.NDArray[np.float64] = np.mean(np.sum(residual**2, axis=-1), axis=-1)
    return losses


def variant_keeps(masks: torch.Tensor) -> torch.Tensor:
    """Masks ``[B, K, N]`` → keep rows ``[B, 1+2K, N]``: all tokens, then each mask
    followed by its complement."""
    b, k, n = masks.shape
    pairs = torch.stack((masks, ~masks), dim=2).reshape(b, 2 * k, n)
    return torch.cat((torch.ones_like(masks[:, :1]), pairs), dim=1)


def _hashes(batch: Sequence[EncodeRequest]) -> list[bytes]:
    return [request.data_sha256 for request in batch]


def _text(request: EncodeRequest) -> str:
    """The caption as the encoders read it (``encoders.caption``). A submission's text
    is read so when decoded; reading it again is the identity, and makes every caller
    (training, evaluation, tools) encode what the node encodes."""
    if not isinstance(request.media, str):
        raise ValueError(f"text request holds {type(request.media).__name__}, not str")
    return read_caption(request.media)


def _array(request: EncodeRequest) -> npt.NDArray[np.float32]:
    if isinstance(request.media, str):
        raise ValueError(f"{request.modality} request holds text")
    array: npt.NDArray[np.float32] = np.ascontiguousarray(request.media, dtype=np.float32)
    return array
