"""Binding image, audio and video to the frozen text tower with InfoNCE.

Every encoder of the shard trains on the same batches from its own
initialisation seed. Each step draws one batch per modality and pairs each
item with a random phrasing of its concept; image-audio, image-video and
audio-video are never paired, so their alignment is emergent (ImageBind).
Items are sometimes seen through a random token mask of the modality's
mask share, so that an encoder's embedding of part of an input stays
close to the whole — what the differential loss measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoders.channels import Memo
from encoders.masks import MASK_SHARES
from encoders.media import PreprocessSpec
from encoders.modality import PATCHED, Modality
from encoders.model import MultimodalEncoder
from encoders.patches import audio_patches, image_patches, video_tubelets
from encoders.weights import config_for
from training.corpus import Corpus, Split
from training.losses import symmetric_nce
from training.text_table import TextTable
from training.world import Concept

_PATCHIFY = {
    Modality.IMAGE: image_patches,
    Modality.VIDEO: video_tubelets,
    Modality.AUDIO: audio_patches,
}
_FACTORED = frozenset({Modality.IMAGE, Modality.VIDEO})
"""Modalities trained with the factored InfoNCE (``_factored_nce``): colour half by colour,
shape half by shape (and motion). Audio keeps the whole-concept InfoNCE over its two halves,
as in every shipped version: speech names colour and shape in one breath."""
_SHRUNK_SHARE = 0.3
"""Share of training pictures scaled down onto their edge colour (``BatchMaker._shrink``)."""
_FLIP = {"left": "right", "right": "left", "up": "up", "down": "down"}
_REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@dataclass(frozen=True)
class TrainSettings:
    """Everything that, with the corpus, determines the trained weights."""

    seed: int = 0
    encoder_seeds: tuple[int, ...] = (0, 1)
    dim: int = 256
    width: int = 128
    depth: int = 2
    heads: int = 4
    epochs: int = 20
    batch_size: int = 96
    learning_rate: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    temperature: float = 0.07
    """Initial InfoNCE temperature of the modalities in ``learn_temperature``."""
    learn_temperature: tuple[str, ...] = ("audio",)
    """Modalities whose InfoNCE temperature is learned (as CLIP does), each its own."""
    fixed_temperature: float = 0.2
    """Temperature of the other modalities (image and video). A learned temperature
    sharpens until ranking is enough: matched halves then sit anywhere above their
    negatives, where one δ per modality pair needs them close in absolute terms, and
    text→video needs a caption's own motion nearer than a better-drawn clip of the
    same figure moving another way (with a learned video temperature, every
    text→video miss was such a motion). A high fixed one keeps pulling matched
    halves together after ranking is right."""
    masked_share: float = 0.3
    """Probability that a training item is seen through one random mask."""
    schedule: tuple[str, ...] = ("image", "image", "video", "video", "audio", "audio", "audio")
    """Optimizer updates per step, one batch each. Audio, the hardest, gets three;
    image and video two each, as they share the text head's shape half."""

    def __post_init__(self) -> None:
        names = {m.value for m in PATCHED}
        for key in ("schedule", "learn_temperature"):
            unknown = sorted(set(getattr(self, key)) - names)
            if unknown:
                raise ValueError(f"{key} names no modality of {sorted(names)}: {unknown}")


@dataclass(frozen=True)
class EpochReport:
    """Mean loss per modality and held-out recall@1 (item → concept text) of encoder 0."""

    epoch: int
    loss: dict[Modality, float]
    recall: dict[Modality, float]


@dataclass
class _Member:
    model: MultimodalEncoder
    log_scales: dict[Modality, torch.Tensor]
    optimizer: torch.optim.Optimizer
    losses: dict[Modality, list[float]] = field(default_factory=dict)


def new_encoder(spec: PreprocessSpec, settings: TrainSettings, seed: int) -> MultimodalEncoder:
    config = config_for(spec, settings.dim, settings.width, settings.depth, settings.heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalEncoder(config)


def motion_maps(moving: tuple[Concept, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept ids after a horizontal flip and after playing a clip backwards."""
    index = {c: i for i, c in enumerate(moving)}
    flip = [index[Concept(c.colour, c.shape, _FLIP[c.motion])] for c in moving]
    reverse = [index[Concept(c.colour, c.shape, _REVERSE[c.motion])] for c in moving]
    return torch.tensor(flip), torch.tensor(reverse)


class BatchMaker:
    """Decoded, augmented batches and the random masks that hide tokens."""

    def __init__(self, corpus: Corpus, generator: torch.Generator) -> None:
        self.generator = generator
        self.flip_map, self.reverse_map = motion_maps(corpus.moving)

    def coin(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent draws, each True with probability ``p``."""
        return torch.rand(n, generator=self.generator) < p

    def batch(self, split: Split, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented model input ``[B, ...]`` (before patching) and concept ids ``[B]``."""
        x = torch.from_numpy(split.decoded(rows))
        labels = torch.from_numpy(split.concepts[rows])
        n = len(rows)
        if split.modality is Modality.IMAGE:
            flip = self.coin(n, 0.5)
            x[flip] = x[flip].flip(-1)
            x = self._shrink(self._turn(x))
        elif split.modality is Modality.VIDEO:
            flip = self.coin(n, 0.5)
            x[flip] = x[flip].flip(-1)
            labels = torch.where(flip, self.flip_map[labels], labels)
            backwards = self.coin(n, 0.5)
            x[backwards] = x[backwards].flip(1)
            labels = torch.where(backwards, self.reverse_map[labels], labels)
        else:
            x = self._audio(x)
        return x, labels

    def _turn(self, x: torch.Tensor) -> torch.Tensor:
        """Quarter turns and vertical flips, which keep every shape of the world its own
        (a square stays a square, a diamond a diamond); a 45° turn would not."""
        quarters = torch.randint(0, 4, (x.shape[0],), generator=self.generator)
        for k in (1, 2, 3):
            chosen = quarters == k
            x[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        upside = self.coin(x.shape[0], 0.5)
        x[upside] = x[upside].flip(-2)
        return x

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        """A share of pictures scaled down (45-85 %) onto their own edge colour, anywhere.

        Figures then come as small as in video frames and in oblong pictures fitted
        to the square, which the shape network, shared with video, must read too.
        """
        chosen = torch.nonzero(self.coin(x.shape[0], _SHRUNK_SHARE)).flatten().tolist()
        side = x.shape[-1]
        for i in chosen:
            draws = torch.rand(3, generator=self.generator).tolist()
            small = max(8, round(side * (0.45 + 0.4 * draws[0])))
            picture = F.interpolate(
                x[i : i + 1], size=(small, small), mode="bilinear", antialias=True
            )[0]
            edge = torch.cat(
                [x[i, :, 0], x[i, :, -1], x[i, :, 1:-1, 0], x[i, :, 1:-1, -1]], dim=1
            ).mean(dim=1)
            top, left = (round(d * (side - small)) for d in draws[1:])
            x[i] = edge[:, None, None]
            x[i, :, top : top + small, left : left + small] = picture
        return x

    def _audio(self, x: torch.Tensor) -> torch.Tensor:
        """Time shift and a masked band of frequencies (SpecAugment-like).

        No time masking: a masked stretch of frames could erase a whole word,
        and with it the concept.
        """
        out = x.clone()
        n, mels, _ = x.shape
        floor = x.amin(dim=(1, 2))
        for i in range(n):
            draws = torch.randint(0, 1 << 30, (3,), generator=self.generator).tolist()
            shift = draws[0] % 41 - 20
            out[i] = torch.roll(out[i], shift, dims=1)
            if shift > 0:
                out[i, :, :shift] = floor[i]
            elif shift < 0:
                out[i, :, shift:] = floor[i]
            width = draws[1] % 7
            start = draws[2] % (mels - width + 1)
            out[i, start : start + width, :] = floor[i]
        return out

    def keep(self, modality: Modality, n: int, n_tokens: int, share: float) -> torch.Tensor:
        """``[B, 1, N]``: every token for most items, a random mask for a ``share`` of them."""
        keep = torch.ones(n, 1, n_tokens, dtype=torch.bool)
        kept = max(1, round(MASK_SHARES[modality] * n_tokens))
        for i in torch.nonzero(self.coin(n, share)).flatten().tolist():
            order = torch.randperm(n_tokens, generator=self.generator)
            keep[i, 0] = False
            keep[i, 0, order[:kept]] = True
        return keep


def _cycle(n: int, rng: np.random.Generator, batch: int) -> Iterator[np.ndarray]:
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


def held_out_recall(
    model: MultimodalEncoder, corpus: Corpus, still: TextTable, moving: TextTable
) -> dict[Modality, float]:
    """Share of held-out items whose nearest concept caption, over every concept, is their own.

    The gallery holds the training concepts too: the held-out concepts alone
    differ pairwise in colour, so recall over them would not see shape.
    """
    recall = {}
    with torch.inference_mode():
        for modality in PATCHED:
            split = corpus.test[modality]
            table = moving if modality is Modality.VIDEO else still
            concepts = corpus.concepts_of(modality)
            assert all(concepts[int(i)].held_out for i in set(split.concepts.tolist()))
            ids = list(range(len(concepts)))
            texts = model.encode_text(table.features[ids, :1])[:, 0]
            hits = 0
            for start in range(0, len(split), 128):
                rows = np.arange(start, min(len(split), start + 128))
                patches = _PATCHIFY[modality](torch.from_numpy(split.decoded(rows)))
                keep = torch.ones(len(rows), 1, patches.shape[1], dtype=torch.bool)
                emb = model.encode_patches(modality, patches, keep)[:, 0]
                best = torch.tensor(ids)[(emb @ texts.T).argmax(dim=1)]
                hits += int((best == torch.from_numpy(split.concepts[rows])).sum())
            recall[modality] = hits / len(split)
    return recall


def train(
    corpus: Corpus,
    spec: PreprocessSpec,
    still: TextTable,
    moving: TextTable,
    settings: TrainSettings,
    *,
    on_epoch: Callable[[EpochReport], None] = lambda report: None,
    progress: Callable[[int], Iterator[int]] = lambda total: iter(range(total)),
) -> list[MultimodalEncoder]:
    """Train one encoder per seed of ``settings.encoder_seeds``; return them in eval mode."""
    factors = {m: concept_factors(corpus.concepts_of(m)) for m in PATCHED}
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    maker = BatchMaker(corpus, generator)
    members = []
    for seed in settings.encoder_seeds:
        model = new_encoder(spec, settings, seed)
        log_scales = {
            m: (
                torch.tensor(math.log(1.0 / settings.temperature), requires_grad=True)
                if m.value in settings.learn_temperature
                else torch.tensor(math.log(1.0 / settings.fixed_temperature))
            )
            for m in PATCHED
        }
        learned = [t for t in log_scales.values() if t.requires_grad]
        groups: list[dict[str, Any]] = [
            {"params": [*model.parameters()]},
            {"params": learned, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=settings.learning_rate,
            weight_decay=settings.weight_decay,
        )
        members.append(_Member(model, log_scales, optimizer))
    batch = settings.batch_size
    steps_per_epoch = len(corpus.train[Modality.IMAGE]) // batch
    total = steps_per_epoch * settings.epochs
    streams = {m: _cycle(len(corpus.train[m]), rng, batch) for m in PATCHED}
    step = 0
    for epoch in range(1, settings.epochs + 1):
        for member in members:
            member.model.train()
            member.losses = {m: [] for m in PATCHED}
        for _ in progress(steps_per_epoch):
            lr = _learning_rate(step, total, settings)
            for member in members:
                for group in member.optimizer.param_groups:
                    group["lr"] = lr
            for name in settings.schedule:
                modality = Modality(name)
                split = corpus.train[modality]
                x, labels = maker.batch(split, next(streams[modality]))
                patches = _PATCHIFY[modality](x)
                keep = maker.keep(modality, batch, patches.shape[1], settings.masked_share)
                table = moving if modality is Modality.VIDEO else still
                phrasing = torch.randint(0, table.features.shape[1], (batch,), generator=generator)
                features = table.features[labels, phrasing]
                memo: Memo = {}  # the members share the channels computed without parameters
                for member in members:
                    member.optimizer.zero_grad(set_to_none=True)
                    scale = member.log_scales[modality].clamp(max=math.log(100.0)).exp()
                    items = member.model.encode_patches(modality, patches, keep, memo)
                    items = items[:, 0]
                    texts = member.model.encode_text(features)
                    if modality in _FACTORED:
                        loss = _factored_nce(items, texts, factors[modality], labels, scale)
                    else:
                        loss = symmetric_nce(items, texts, labels, scale)
                    loss.backward()  # type: ignore[no-untyped-call]
                    member.optimizer.step()
                    member.losses[modality].append(float(loss.detach()))
            step += 1
        for member in members:
            member.model.eval()
        report = EpochReport(
            epoch,
            {m: float(np.mean(members[0].losses[m])) for m in PATCHED},
            held_out_recall(members[0].model, corpus, still, moving),
        )
        on_epoch(report)
    for member in members:
        member.model.requires_grad_(False)
    return [member.model for member in members]


def concept_factors(concepts: tuple[Concept, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour index, and shape (with motion, for video) index, of every concept of a table."""
    colours = sorted({c.colour for c in concepts})
    forms = sorted({(c.shape, c.motion) for c in concepts})
    return (
        torch.tensor([colours.index(c.colour) for c in concepts]),
        torch.tensor([forms.index((c.shape, c.motion)) for c in concepts]),
    )


def _factored_nce(
    items: torch.Tensor,
    texts: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """InfoNCE of the embeddings' first half by colour and second half by shape.

    Items of the same colour are positives of each other in the first half
    whatever their shape, and likewise for shape in the second: each half must
    carry its attribute alone, so an unseen colour-shape combination lands where
    its colour and its shape, each seen in training, point.
    """
    half = items.shape[1] // 2
    losses = []
    for part, factor in zip((slice(0, half), slice(half, None)), factors, strict=True):
        a = F.normalize(items[:, part], dim=-1)
        b = F.normalize(texts[:, part], dim=-1)
        losses.append(symmetric_nce(a, b, factor[labels], scale))
    return 0.5 * (losses[0] + losses[1])


def _learning_rate(step: int, total: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
