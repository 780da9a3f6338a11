from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from encoders.errors import UndecodableError
from encoders.media import media_type_of
from tests.media import image_bytes, mp4_bytes, wav_bytes


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (image_bytes("RGB"), "image/png"),
        (image_bytes("RGB", "JPEG"), "image/jpeg"),
        (wav_bytes("PCM_16"), "audio/wav"),
        (mp4_bytes(frames=2), "video/mp4"),
        ("a cat on a mat ✓\n".encode(), "text/plain"),
    ],
)
def test_media_type_from_magic_bytes(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "item.bin"
    path.write_bytes(data)
    assert media_type_of(path) == expected


@pytest.mark.parametrize("data", [b"", b"\xff\xfe\x00binary"])
def test_unknown_bytes_are_undecodable(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "item.bin"
    path.write_bytes(data)
    with pytest.raises(UndecodableError):
        media_type_of(path)


def test_decoding_media_never_imports_torch() -> None:
    code = (
        "import sys, encoders.media, encoders.fusion, encoders.masks;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
