"""agent.ed25519: the agent's Ed25519 verification through libcrypto, against RFC 8032's test
vectors and against the cryptography package on random keys, messages and tampering."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.agent.contract import ed25519
from edgefleet.agent.contract.ed25519 import VerifyKey, verify

# RFC 8032, section 7.1: TEST 1, 2, 3 (public key, message, signature).
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]  # fmt: skip

BACKENDS = {"agent": verify, "cryptography": ed25519._cryptography_verify}


def _raw(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize(("pub", "msg", "sig"), RFC8032)
def test_rfc8032_vectors_verify_and_any_flipped_bit_does_not(pub: str, msg: str, sig: str) -> None:
    key, message, signature = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
    assert verify(key, signature, message)
    assert VerifyKey(key).verifies(signature, message)
    for i in (0, 31, 32, 63):
        bad = bytearray(signature)
        bad[i] ^= 0x01
        assert not verify(key, bytes(bad), message)
    assert not verify(key, signature, message + b"\0")
    other = bytearray(key)
    other[0] ^= 0x01
    assert not verify(bytes(other), signature, message)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_both_backends_agree_on_random_keys_and_tampering(name: str) -> None:
    check = BACKENDS[name]
    for n in (0, 1, 64, 4096):
        k, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        msg = os.urandom(n)
        sig = k.sign(msg)
        assert check(_raw(k), sig, msg)
        assert not check(_raw(other), sig, msg)
        assert not check(_raw(k), other.sign(msg), msg)
        assert not check(_raw(k), sig, msg + b"x")


def test_wrong_sizes_and_non_canonical_signatures_are_not_valid() -> None:
    k = Ed25519PrivateKey.generate()
    msg = b"desired state"
    sig = k.sign(msg)
    assert not verify(_raw(k), sig[:63], msg)
    assert not verify(_raw(k), sig + b"\0", msg)
    assert not verify(_raw(k)[:31], sig, msg)
    assert not verify(b"", b"", b"")
    # S + L (the group order) is the same point arithmetic, but RFC 8032 requires S < L:
    # accepting it would make signatures malleable.
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + order
    assert s < 2**256
    assert not verify(_raw(k), sig[:32] + s.to_bytes(32, "little"), msg)
    assert not ed25519._cryptography_verify(_raw(k), sig[:32] + s.to_bytes(32, "little"), msg)
    with pytest.raises(ValueError, match="32 bytes, got 31"):
        VerifyKey(_raw(k)[:31])

