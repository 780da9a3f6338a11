"""open_clip (image and text) as a shard encoder, from a local checkpoint only.

Needs the ``openclip`` extra (``open-clip-torch``, which imports
torchvision: install it with a constraints file pinning ``torch==2.13.0``,
see docs/ENCODERS.md). Nothing is downloaded: the architecture is built with
``pretrained=None`` and the weights come from the manifest's verified
safetensors file.

Masks: an image's hidden 16x16 patches are set to mid-grey before the image
is resized to the model's input size; a text variant is the string of its
kept wordpieces, tokenized by open_clip's own tokenizer.

Manifest entry::

    {"kind": "open_clip", "file": "clip.safetensors",
     "config": {"model": "ViT-B-32"}}

The manifest's ``dim`` must equal the model's embedding width (512 for
ViT-B-32), and every encoder of the shard must share it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from encoders.errors import WeightsError
from encoders.interface import EncoderSpec, TextVariants
from encoders.modality import Modality
from encoders.patches import unpatchify

try:
    import open_clip  # type: ignore[import-not-found, unused-ignore]
except Exception as _error:  # torchvision beside CPU torch fails with RuntimeError, not ImportError
    open_clip = None
    IMPORT_ERROR: Exception | None = _error
else:
    IMPORT_ERROR = None

__all__ = ["IMPORT_ERROR", "OpenClipEncoder", "from_model", "load", "unpatchify"]


class OpenClipEncoder(torch.nn.Module):
    """An open_clip model behind the ``encoders.interface.Encoder`` contract."""

    modalities = frozenset({Modality.TEXT, Modality.IMAGE})

    def __init__(
        self, model: Any, tokenizer: Any, image_size: int, mean: Any, std: Any, device: str
    ) -> None:
        super().__init__()
        self.device = device
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self._dim = (
            int(model.text_projection.shape[-1])
            if hasattr(model, "text_projection") and model.text_projection is not None
            else int(model.visual.output_dim)
        )

    @property
    def dim(self) -> int:
        return self._dim

    def embed_text(self, text: TextVariants) -> torch.Tensor:
        strings = text.strings
        flat = [s for variants in strings for s in variants]
        tokens = self.tokenizer(flat).to(self.device)
        out = self.model.encode_text(tokens, normalize=True).float()
        return F.normalize(out, dim=-1).reshape(len(strings), len(strings[0]), -1)

    def embed_patches(
        self, modality: Modality, patches: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        if modality is not Modality.IMAGE:
            raise ValueError(f"open_clip reads images and text, not {modality}")
        images = unpatchify(patches, keep)
        images = F.interpolate(
            (images + 1.0) / 2.0,
            size=(self.image_size, self.image_size),
            mode="bicubic",
            align_corners=False,
        ).clamp(0.0, 1.0)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        out = self.model.encode_image((images - mean) / std, normalize=True).float()
        return F.normalize(out, dim=-1).reshape(keep.shape[0], keep.shape[1], -1)


def from_model(model: Any, model_name: str, device: str = "cpu") -> OpenClipEncoder:
    """Wrap an already built open_clip model (tests use a randomly initialised one)."""
    if open_clip is None:
        raise WeightsError(f"open_clip cannot be imported: {IMPORT_ERROR}")
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, tuple | list) else size)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    encoder = OpenClipEncoder(
        model.eval().to(device), open_clip.get_tokenizer(model_name), image_size, mean, std, device
    )
    encoder.requires_grad_(False)
    return encoder


def load(spec: EncoderSpec) -> OpenClipEncoder:
    """Loader of kind ``"open_clip"``: the named architecture with the entry's weights."""
    if open_clip is None:
        raise WeightsError(f"open_clip cannot be imported: {IMPORT_ERROR}")
    name = str(spec.config["model"])
    try:
        model = open_clip.create_model(name, pretrained=None)
        model.load_state_dict(
            {k: v.float() for k, v in load_file(str(spec.path)).items()}, strict=True
        )
    except Exception as exc:
        raise WeightsError(f"{spec.path} is not open_clip {name} weights: {exc}") from exc
    return from_model(model, name, spec.device)
