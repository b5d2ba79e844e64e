"""Key derivation and AEAD for encrypted images, nothing else (construction: docs/FORMAT.md, Key slot).

pyca/cryptography provides Argon2id (>= 44), AES-256-GCM and HKDF, so none of it is written by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BadImage, EnvironmentProblem, WrongPassword
from . import imgk_layout as L

DEFAULT_ITERATIONS = 3
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_LANES = 4


def _crypto():
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as e:  # Debian's cryptography 38 lacks Argon2id
        raise EnvironmentProblem(f"encryption needs cryptography >= 44 with Argon2id ({e})",
                                 hint="pip install 'cryptography>=44'") from None
    return InvalidTag, hashes, AESGCM, Argon2id, HKDF


def derive_kek(password: bytes, slot: L.KeySlot) -> bytes:
    _, _, _, Argon2id, _ = _crypto()
    return Argon2id(salt=slot.salt, length=32, iterations=slot.iterations, lanes=slot.lanes,
                    memory_cost=slot.memory_kib).derive(password)


@dataclass
class ImageKeys:
    """The per-image keys derived from the data key (FORMAT.md: chunk_key, section_key, mac_key)."""
    data_key: bytes
    chunk_key: bytes
    section_key: bytes
    mac_key: bytes

    @classmethod
    def from_data_key(cls, data_key: bytes, image_id: bytes) -> "ImageKeys":
        _, hashes, _, _, HKDF = _crypto()

        def hkdf(info: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=image_id, info=info).derive(data_key)

        return cls(data_key, hkdf(b"imgkit-v1-chunk"), hkdf(b"imgkit-v1-section"), hkdf(b"imgkit-v1-mac"))


def new_key_slot(password: bytes, data_key: bytes, core_digest: bytes,
                 iterations: int = DEFAULT_ITERATIONS, memory_kib: int = DEFAULT_MEMORY_KIB,
                 lanes: int = DEFAULT_LANES) -> L.KeySlot:
    """Wrap data_key under a fresh salt and nonce (used at capture and by `imgkit passwd`)."""
    _, _, AESGCM, _, _ = _crypto()
    slot = L.KeySlot(L.KDF_ARGON2ID, iterations, memory_kib, lanes, os.urandom(16), os.urandom(12), b"")
    kek = derive_kek(password, slot)
    slot.wrapped_key = AESGCM(kek).encrypt(slot.wrap_nonce, data_key, L.wrap_ad(core_digest))
    return slot


def sealer_factory_for(password: bytes):
    """What ImageWriter calls, once the image's id and header core exist, to encrypt a new image
    under `password`: a fresh random data key, its key slot, and the Sealer for the chunks."""
    def new_sealer(image_id: bytes, core_digest: bytes):
        data_key = os.urandom(32)
        slot = new_key_slot(password, data_key, core_digest)
        return Sealer(ImageKeys.from_data_key(data_key, image_id), core_digest), slot
    return new_sealer


def unwrap_data_key(password: bytes, slot: L.KeySlot, core_digest: bytes) -> bytes:
    """One Argon2id derivation; a tag failure means the password is wrong (or the slot was tampered)."""
    InvalidTag, _, AESGCM, _, _ = _crypto()
    kek = derive_kek(password, slot)
    try:
        return AESGCM(kek).decrypt(slot.wrap_nonce, slot.wrapped_key, L.wrap_ad(core_digest))
    except InvalidTag:
        raise WrongPassword("wrong password", hint="the password does not open this image") from None


class Sealer:
    """AEAD of chunks and sections under one image's keys. Thread-safe (AESGCM objects are)."""

    def __init__(self, keys: ImageKeys, core_digest: bytes):
        InvalidTag, _, AESGCM, _, _ = _crypto()
        self._invalid = InvalidTag
        self._chunk = AESGCM(keys.chunk_key)
        self._section = AESGCM(keys.section_key)
        self.mac_key = keys.mac_key
        self._core = core_digest

    def seal_chunk(self, obj: int, length: int, encoding: int, payload: bytes) -> bytes:
        return self._chunk.encrypt(L.chunk_nonce(obj), payload, L.chunk_ad(self._core, obj, length, encoding))

    def open_chunk(self, obj: int, length: int, encoding: int, stored: bytes, offset: int) -> bytes:
        try:
            return self._chunk.decrypt(L.chunk_nonce(obj), stored, L.chunk_ad(self._core, obj, length, encoding))
        except self._invalid:
            from ..errors import CorruptChunk
            raise CorruptChunk(f"chunk at offset {offset} failed authentication (damaged, swapped or "
                               "tampered with)", offset) from None

    def seal_section(self, section_type: int, seq: int, data: bytes) -> bytes:
        """nonce || ciphertext || tag with a random nonce: split, join and later rewrites seal new
        sections under the same section_key, so a counter nonce (seq) would repeat (FORMAT.md)."""
        nonce = os.urandom(L.AEAD_NONCE_SIZE)
        return nonce + self._section.encrypt(nonce, data, L.section_ad(self._core, section_type, seq))

    def open_section(self, section_type: int, seq: int, stored: bytes) -> bytes:
        if len(stored) < L.SECTION_SEAL_OVERHEAD:
            raise BadImage(f"section {seq} (type {section_type}) is too short to be sealed")
        nonce, sealed = stored[:L.AEAD_NONCE_SIZE], stored[L.AEAD_NONCE_SIZE:]
        try:
            return self._section.decrypt(nonce, sealed, L.section_ad(self._core, section_type, seq))
        except self._invalid:
            raise BadImage(f"section {seq} (type {section_type}) failed authentication") from None
