"""A Hugging Face CLIP checkpoint (image and text) as a shard encoder, offline.

The checkpoint is a folder beside the manifest (``clip/``) as
``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained`` write
it: ``config.json``, safetensors weights, the tokenizer's files and the
image processor's config. Every file of that folder must be pinned in the
manifest's ``files`` (``read_manifest`` checks each hash before any loader
runs, and a mismatch names the file and both hashes); a file of the folder
that is not pinned is refused, since ``from_pretrained`` might read it.
Loading uses ``local_files_only=True`` and ``use_safetensors=True``: nothing
is downloaded and no pickle is read.

Manifest entry (the entry's ``file`` is the weights; its folder is the
checkpoint)::

    {"kind": "hf_clip", "file": "clip/model.safetensors", "config": {}}

The manifest's ``dim`` is the model's ``projection_dim``.
``write_manifest`` writes such a manifest for a prepared folder.

Pictures: the node decodes an image to ``[3, S, S]`` in [-1, 1] (``S`` the
manifest's ``preprocess.image_size``, the whole picture resized, not
cropped). Its hidden 16x16 patches are set to mid-grey (``unpatchify``),
the pixels mapped to [0, 1], resized (bicubic, antialiased) to the vision
tower's ``image_size`` when ``S`` differs, and normalised with the image
processor's ``image_mean``/``image_std``. The processor's own shortest-edge
resize and centre crop are not applied: on the node's square picture they
amount to the same resize, and a crop would cut off what the node decoded.
``write_manifest`` sets ``S`` to the model's input size (rounded down to a
multiple of 16), so no resize happens at all for 224 or 336.

Text: each variant's string (the kept wordpieces, ``TextVariants.strings``)
goes through the checkpoint's own tokenizer, padded and truncated to the
text tower's positions.

Video and audio are not read (``modalities`` is text and image): an item of
those modalities has no encoder in a CLIP-only shard.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from encoders.errors import WeightsError
from encoders.interface import EncoderSpec, TextVariants
from encoders.modality import Modality
from encoders.patches import PATCH, unpatchify

KIND = "hf_clip"
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json")
"""What ``from_pretrained(..., use_safetensors=True)`` reads weights from, in this order."""


class HfClipEncoder(torch.nn.Module):
    """A transformers ``CLIPModel`` behind the ``encoders.interface.Encoder`` contract."""

    modalities = frozenset({Modality.TEXT, Modality.IMAGE})

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: str,
    ) -> None:
        super().__init__()
        self.device = device
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_tokens = int(
            min(
                model.config.text_config.max_position_embeddings,
                getattr(tokenizer, "model_max_length", None) or 10**9,
            )
        )
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._dim = int(model.config.projection_dim)

    @property
    def dim(self) -> int:
        return self._dim

    def embed_text(self, text: TextVariants) -> torch.Tensor:
        strings = text.strings
        flat = [s for variants in strings for s in variants]
        tokens = self.tokenizer(
            flat,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        out = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )
        return F.normalize(out.float(), dim=-1).reshape(len(strings), len(strings[0]), -1)

    def embed_patches(
        self, modality: Modality, patches: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        if modality is not Modality.IMAGE:
            raise ValueError(f"a Hugging Face CLIP reads images and text, not {modality}")
        images = (unpatchify(patches.float(), keep) + 1.0) / 2.0
        if images.shape[-1] != self.image_size:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).clamp(0.0, 1.0)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        out = _features(self.model.get_image_features(pixel_values=(images - mean) / std))
        return F.normalize(out.float(), dim=-1).reshape(keep.shape[0], keep.shape[1], -1)


def _features(out: Any) -> torch.Tensor:
    """Projected features: a tensor (transformers 4) or an output's ``pooler_output`` (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled: torch.Tensor = out.pooler_output
    return pooled


def from_pretrained(folder: Path, device: str = "cpu") -> HfClipEncoder:
    """Build the encoder from a checkpoint folder, from local files only.

    The caller has verified the folder's files (``load`` does, through the
    manifest). The model runs in float32 whatever the checkpoint's dtype, as
    the project's own encoders do.
    """
    from transformers import CLIPModel, CLIPProcessor

    try:
        model: Any = _quietly(
            lambda: CLIPModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True
            )
        )
        processor = _quietly(
            lambda: CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        )
    except Exception as exc:
        raise WeightsError(f"{folder} is not a loadable CLIP checkpoint: {exc}") from exc
    images = processor.image_processor
    if getattr(images, "do_normalize", True):
        mean, std = _triple(images.image_mean), _triple(images.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    model = model.float().eval().to(device)
    model.requires_grad_(False)
    encoder = HfClipEncoder(model, processor.tokenizer, mean, std, device)
    encoder.requires_grad_(False)
    return encoder


def _quietly(build: Any) -> Any:
    """Run ``build`` without transformers' progress bars and warnings in the node's log.

    The warning silenced is that torchvision is missing: the processor then
    falls back to its PIL image processor, whose mean and std are all this
    adapter reads from it.
    """
    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    logger = logging.getLogger("transformers")
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        return build()
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _triple(values: Any) -> tuple[float, float, float]:
    items = [float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3)]
    if len(items) != 3:
        raise WeightsError(f"image mean/std {values!r} is not one value per RGB channel")
    return items[0], items[1], items[2]


def check_pinned(folder: Path, pinned: Mapping[str, Path]) -> None:
    """Refuse a checkpoint folder holding any file the manifest does not pin."""
    known = {path.resolve() for path in pinned.values()}
    if not folder.is_dir():
        raise WeightsError(f"CLIP checkpoint folder {folder} is missing")
    for path in sorted(folder.rglob("*")):
        if (path.is_file() or path.is_symlink()) and path.resolve() not in known:
            raise WeightsError(
                f"{path} is in the CLIP checkpoint folder but not pinned in the manifest's "
                "files: pin it (sha256) or move it out"
            )


def load(spec: EncoderSpec) -> HfClipEncoder:
    """Loader of kind ``"hf_clip"``: the checkpoint folder of the entry's weights file."""
    if spec.path.name not in WEIGHT_NAMES:
        raise WeightsError(
            f"{spec.path} is not a CLIP checkpoint's weights: name {' or '.join(WEIGHT_NAMES)}"
        )
    folder = spec.path.parent
    check_pinned(folder, spec.extra)
    return from_pretrained(folder, spec.device)


def write_manifest(folder: Path, clip: str = "clip", notes: str = "") -> Path:
    """Pin every file of ``folder/clip`` in a new ``folder/manifest.json``; return its path.

    δ is uncalibrated (2.0: no pair refused) until ``poc-node calibrate-pairs``
    measures it; the scoring constants are the untrained ones. The node's
    picture size ``S`` is the vision tower's input size rounded down to a
    multiple of 16; every other preprocessing size is the default one.
    """
    import dataclasses
    import itertools

    from encoders.text_backbone import BACKBONE_FILE, BACKBONE_PACKAGE, backbone_dir
    from encoders.weights import (
        DEFAULT_PREPROCESS,
        FORMAT_VERSION,
        MANIFEST_NAME,
        UNCALIBRATED_DELTA,
        UNCALIBRATED_SCORING,
        pair_key,
        sha256_file,
    )

    checkpoint = folder / clip
    weights = next((checkpoint / n for n in WEIGHT_NAMES if (checkpoint / n).is_file()), None)
    if weights is None:
        raise WeightsError(
            f"{checkpoint} holds no {' or '.join(WEIGHT_NAMES)}: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    image_size = int(config["vision_config"]["image_size"])
    if image_size < PATCH:
        raise WeightsError(f"CLIP input size {image_size} is below one {PATCH}x{PATCH} patch")
    spec = dataclasses.replace(DEFAULT_PREPROCESS, image_size=image_size // PATCH * PATCH)
    files = [
        {"path": path.relative_to(folder).as_posix(), "sha256": sha256_file(path)}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file()
    ]
    modalities = list(Modality)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dim": int(config["projection_dim"]),
        "preprocess": dataclasses.asdict(spec),
        "encoders": [{"kind": KIND, "file": weights.relative_to(folder).as_posix(), "config": {}}],
        "text_backbone": {
            "package": BACKBONE_PACKAGE,
            "file": BACKBONE_FILE,
            "sha256": sha256_file(backbone_dir() / BACKBONE_FILE),
        },
        "files": files,
        "trained": True,
        "pair_delta": {
            pair_key(a, b): UNCALIBRATED_DELTA for a, b in itertools.combinations(modalities, 2)
        },
        "scoring": UNCALIBRATED_SCORING.body(),
        "notes": notes
        or "A Hugging Face CLIP checkpoint (text and image). pair_delta is uncalibrated "
        "(2.0, no pair refused) until `poc-node calibrate-pairs` measures it on the "
        "operator's own pairs.",
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
