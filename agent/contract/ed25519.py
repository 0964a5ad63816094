"""Ed25519 signature verification for the agent, through OpenSSL's libcrypto.

The agent only ever *verifies* (the hub signs). The ``cryptography`` package verifies with
OpenSSL too, but its wheel carries a second, statically linked OpenSSL whose import alone adds
about 6.5 MiB to the resident memory of a process that serves a 10 kB model. The Python process
has already mapped the system libcrypto (``_hashlib`` and ``_ssl`` link it), so the agent calls
its EVP interface directly: the same implementation, no second copy.

Where that is not possible (no shared libcrypto found, or one older than OpenSSL 1.1.1, the
first with raw Ed25519 keys), :func:`verify` falls back to ``cryptography``, which is a core
dependency and always installed. :data:`BACKEND` names the one in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

__all__ = ["BACKEND", "PUBLIC_KEY_SIZE", "SIGNATURE_SIZE", "VerifyKey", "verify"]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_EVP_PKEY_ED25519 = 1087  # NID_ED25519, the same in OpenSSL 1.1.1 and 3.x
_MIN_OPENSSL = 0x10101000  # 1.1.1


def _mapped_libcrypto() -> str | None:
    """The libcrypto this process already has mapped (loaded by ``_hashlib`` / ``_ssl``)."""
    try:
        with Path("/proc/self/maps").open(encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libcrypto.so" in path:
                    return path
    except OSError:
        pass
    return None


def _libcrypto_verifier() -> Callable[[bytes, bytes, bytes], bool] | None:
    import hashlib  # noqa: F401 - makes sure _hashlib (and with it libcrypto) is loaded

    name = _mapped_libcrypto() or ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        lib.OpenSSL_version_num.argtypes = []
        if lib.OpenSSL_version_num() < _MIN_OPENSSL:
            return None
        new_key = lib.EVP_PKEY_new_raw_public_key
        new_key.restype = ctypes.c_void_p
        new_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        free_key = lib.EVP_PKEY_free
        free_key.restype = None
        free_key.argtypes = [ctypes.c_void_p]
        new_ctx = lib.EVP_MD_CTX_new
        new_ctx.restype = ctypes.c_void_p
        new_ctx.argtypes = []
        free_ctx = lib.EVP_MD_CTX_free
        free_ctx.restype = None
        free_ctx.argtypes = [ctypes.c_void_p]
        init = lib.EVP_DigestVerifyInit
        init.restype = ctypes.c_int
        init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        check = lib.EVP_DigestVerify
        check.restype = ctypes.c_int
        check.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        clear_errors = lib.ERR_clear_error
        clear_errors.restype = None
        clear_errors.argtypes = []
    except (OSError, AttributeError):
        return None

    def openssl_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
        key = new_key(_EVP_PKEY_ED25519, None, public_key, len(public_key))
        if not key:
            clear_errors()
            return False
        ctx = new_ctx()
        try:
            if not ctx:
                raise MemoryError("EVP_MD_CTX_new failed")
            # Ed25519 is "pure": no digest, the whole message goes to EVP_DigestVerify at once.
            if init(ctx, None, None, None, key) != 1:
                return False
            return bool(check(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            if ctx:
                free_ctx(ctx)
            free_key(key)
            clear_errors()  # never leave errors queued for the ssl module to report later

    return openssl_verify


def _cryptography_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


_openssl = _libcrypto_verifier()
BACKEND = "libcrypto" if _openssl is not None else "cryptography"
_verify: Callable[[bytes, bytes, bytes], bool] = _openssl or _cryptography_verify


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``
    (the raw 32 bytes). Wrong sizes are simply not valid."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    return _verify(bytes(public_key), bytes(signature), bytes(message))


class VerifyKey:
    """A raw Ed25519 public key that can only verify."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != PUBLIC_KEY_SIZE:
            raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
        self.raw = bytes(raw)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        return verify(self.raw, signature, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.raw.hex()[:16]}…)"
