"""Ed25519 keys: files on disk, signing and verification.

A key file is PKCS#8 PEM written with mode 0600. A key readable by group or
others is refused when loaded: a validator's key that leaked is a validator
anybody can impersonate.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.errors import KeyFileError


class SigningKey:
    """An Ed25519 private key and its 32-byte public key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def to_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def write_key(key: SigningKey, path: Path) -> None:
    """Write ``key`` to a new file readable by its owner only; never overwrite.

    The key is written whole to a temporary file beside ``path``, flushed to
    disk, then linked to ``path``: a full disk or a crash mid-write leaves no
    file there (an empty ``validator.key`` made the next start fail until the
    operator deleted it), and an existing key is never replaced.
    """
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            pem = memoryview(key.to_pem())
            while pem:  # a short write (a file size limit) is followed by the error
                pem = pem[os.write(fd, pem) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)  # fails if a key appeared meanwhile: never overwritten
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as error:
        raise KeyFileError(f"cannot write {path}: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def load_key(path: Path) -> SigningKey:
    """Load a key file, refusing one that others may read."""
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read key {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by its owner "
            f"only (chmod 600 {path})"
        )
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{path} is not a PEM private key: {error}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
    return SigningKey(private)
