"""Encryption at rest for blobs: AES-256-GCM in authenticated chunks.

Contract: :class:`BlobCipher` turns a stream of plaintext chunks into a self-describing container
(``LLMOSENC1\\n`` + 12-byte random nonce prefix + chunks of ``ciphertext || 16-byte tag``) and back. Every chunk is
authenticated with its index and a final-chunk flag as associated data, so a truncated, reordered or altered file
fails to decrypt (:class:`~llmos.errors.IntegrityError`) instead of yielding wrong bytes; a wrong key fails the
same way, with a message that says so. Blobs keep the digest of their *plaintext*, so identity, deduplication and
verification do not depend on the key. The key comes from ``LLMOS_ENCRYPTION_KEY`` (or a key file): 32 bytes in
base64 or hex, or any passphrase (stretched with scrypt and a fixed per-installation salt).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from llmos.errors import IntegrityError, InvalidInputError

MAGIC = b"LLMOSENC1\n"
CHUNK = 1024 * 1024
TAG = 16
NONCE_PREFIX = 8  # + a 4-byte chunk counter = the 12-byte GCM nonce


def derive_key(secret: str, salt: bytes) -> bytes:
    """32 key bytes from base64 / hex key material, or from a passphrase via scrypt."""
    text = secret.strip()
    for decode in (base64.b64decode, bytes.fromhex):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    if len(text) < 12:
        raise InvalidInputError(
            "LLMOS_ENCRYPTION_KEY must be 32 bytes (base64 or hex) or a passphrase of 12+ characters"
        )
    return hashlib.scrypt(text.encode("utf-8"), salt=salt, n=2**14, r=8, p=1, dklen=32)


class BlobCipher:
    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != 32:
            raise InvalidInputError("an encryption key must be 32 bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(index: int, final: bool) -> bytes:
        return MAGIC + struct.pack("<I?", index, final)

    def encrypt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Ciphertext container for the concatenation of ``chunks``."""
        prefix = os.urandom(NONCE_PREFIX)
        yield MAGIC + prefix
        buffer = b""
        index = 0
        source = iter(chunks)
        exhausted = False
        while not exhausted:
            while len(buffer) <= CHUNK:
                try:
                    buffer += next(source)
                except StopIteration:
                    exhausted = True
                    break
            while len(buffer) > CHUNK or (exhausted and buffer is not None):
                piece, buffer = buffer[:CHUNK], buffer[CHUNK:]
                final = exhausted and not buffer
                nonce = prefix + struct.pack("<I", index)
                yield self._aead.encrypt(nonce, piece, self._aad(index, final))
                index += 1
                if final:
                    return

    def decrypt(self, handle: BinaryIO, name: str = "blob") -> Iterator[bytes]:
        """Plaintext chunks of a container read from ``handle`` (positioned at its start)."""
        from cryptography.exceptions import InvalidTag

        header = handle.read(len(MAGIC) + NONCE_PREFIX)
        if not header.startswith(MAGIC) or len(header) != len(MAGIC) + NONCE_PREFIX:
            raise IntegrityError(f"{name} is not an llmos encrypted blob")
        prefix = header[len(MAGIC) :]
        index = 0
        current = handle.read(CHUNK + TAG)
        while True:
            following = handle.read(CHUNK + TAG)
            final = not following
            nonce = prefix + struct.pack("<I", index)
            try:
                yield self._aead.decrypt(nonce, current, self._aad(index, final))
            except InvalidTag as exc:
                raise IntegrityError(
                    f"{name} cannot be decrypted: wrong LLMOS_ENCRYPTION_KEY, or the file was altered or truncated"
                ) from exc
            if final:
                return
            current, index = following, index + 1


def is_encrypted(path: os.PathLike[str] | str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC
