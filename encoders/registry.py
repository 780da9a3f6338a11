"""Encoder kinds: which loader builds an encoder named in a manifest.

``"kind": "poc"`` (the default) is the project's own ``MultimodalEncoder``;
``"open_clip"`` is the optional adapter (``encoders.adapters.open_clip``,
needs the ``openclip`` extra); ``"hf_clip"`` runs a local Hugging Face CLIP
checkpoint (``encoders.adapters.hf_clip``). Any installed distribution can add a kind
through the entry-point group ``poc_node.encoders`` (name = kind, value =
``module:loader``), so an operator plugs in a model without editing the
node. Loaders are imported only when a manifest names their kind.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import cast

from encoders.errors import WeightsError
from encoders.interface import EncoderLoader
from encoders.weights import DEFAULT_KIND

ENTRY_POINT_GROUP = "poc_node.encoders"
_BUILTIN = {
    DEFAULT_KIND: "encoders.shard:load_poc_encoder",
    "open_clip": "encoders.adapters.open_clip:load",
    "hf_clip": "encoders.adapters.hf_clip:load",
}


def loader_for(kind: str) -> EncoderLoader:
    """The loader of ``kind``: built in, else from the ``poc_node.encoders`` entry points."""
    target = _BUILTIN.get(kind)
    if target is None:
        found = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == kind]
        if not found:
            raise WeightsError(
                f"no encoder kind {kind!r}: built in are {sorted(_BUILTIN)}, "
                f"others come from the entry-point group {ENTRY_POINT_GROUP!r}"
            )
        target = found[0].value
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise WeightsError(f"encoder kind {kind!r} cannot be loaded: {exc}") from exc
    return cast(EncoderLoader, getattr(module, attribute))
