import os
import stat

import pytest

from node.errors import KeyFileError
from node.intake.keys import SigningKey, load_key, verify_signature, write_key


def test_written_key_is_private_and_loads(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "me.key"
    write_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_key(path)
    assert loaded.public_key == key.public_key
    assert verify_signature(key.public_key, b"m", loaded.sign(b"m"))
    assert not verify_signature(key.public_key, b"n", loaded.sign(b"m"))


def test_existing_key_is_never_overwritten(tmp_path):
    path = tmp_path / "me.key"
    write_key(SigningKey.generate(), path)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key(SigningKey.generate(), path)


def test_world_readable_key_is_refused(tmp_path):
    path = tmp_path / "me.key"
    write_key(SigningKey.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)


def test_garbage_key_file(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_key(path)
