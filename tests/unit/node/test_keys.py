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


def test_a_key_the_disk_cannot_hold_leaves_no_file_and_a_later_start_makes_one(tmp_path):
    """Found from the outside: a first start on a full disk left an empty
    validator.key, and every later start failed on it until it was deleted by hand.
    A process whose file size limit is below a key's size writes it (a real short
    write, then EFBIG), as a full disk would."""
    import subprocess
    import sys

    path = tmp_path / "validator.key"
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from node.errors import KeyFileError\n"
        "from node.intake.keys import SigningKey, write_key\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "try:\n"
        "    write_key(SigningKey.generate(), Path(sys.argv[1]))\n"
        "except KeyFileError as error:\n"
        "    print(error)\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot write {path}" in done.stdout
    assert os.listdir(tmp_path) == []  # neither the key nor its temporary file
    key = SigningKey.generate()
    write_key(key, path)  # the disk has room again: the next start makes the key
    assert load_key(path).public_key == key.public_key
