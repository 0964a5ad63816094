"""Key ceremonies on a hub home: rotate the signing key, rotate the root key, show the keys.

Files under ``DIR/keys/``::

    root.pem, signing.pem   the current keys
    keyring.json            the root-signed keyring the daemon publishes (retained)
    roots.json              the chain of root rotations (``edgefleet.roots/v1``), published retained
    retired/                every replaced private key, named by key id (kept for audit)

A signing-key rotation writes keyring version N+1 listing the new key, and by default revokes the
old one (devices then refuse anything it signs). A root rotation signs root version N+1 with the
old *and* the new root key, appends it to the chain, and re-signs the keyring with the new root;
``--reset-seq`` also lets devices accept lower ``seq`` values again (recovery from a stolen
signing key that pushed ``seq`` up) and therefore also rotates the signing key. Devices need no
re-provisioning. The daemon loads keys at start: restart it (``edgefleet-hub serve``) to publish.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.envelope import key_id, open_envelope, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.wire import KeyEntry, Keyring, parse_json_object
from edgefleet.agent.core.trust import RootRotation, roots_message
from edgefleet.hub.adapters.home import HubHome, keyring_path

__all__ = ["add_keys_commands", "roots_path", "rotate_root", "rotate_signing", "show_keys"]


def roots_path(home: HubHome) -> Path:
    return home.keys / "roots.json"


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _retire(home: HubHome, name: str, key: Ed25519PrivateKey) -> None:
    retired = home.keys / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    atomic_write(retired / f"{name}-{key_id(key.public_key())[:16]}.pem", _pem(key), mode=0o600)


def _current_ring(home: HubHome) -> Keyring:
    raw = keyring_path(home).read_bytes()
    return Keyring.from_dict(parse_json_object(open_envelope(raw).payload, "keyring"))


def _chain(home: HubHome) -> list[bytes]:
    path = roots_path(home)
    if not path.exists():
        return []
    return [c.encode() for c in json.loads(path.read_text())["chain"]]


def _write_ring(home: HubHome, ring: Keyring, root: Ed25519PrivateKey) -> None:
    atomic_write(keyring_path(home), sign_envelope(ring.to_dict(), [root]), mode=0o600)


def rotate_signing(home: HubHome, *, revoke: bool = True, now: float | None = None) -> Keyring:
    """New signing key; keyring N+1 lists only it (and revokes the old one unless told not)."""
    fleet = home.config().fleet
    ring = _current_ring(home) if keyring_path(home).exists() else None
    old = home.signing_key()
    new = Ed25519PrivateKey.generate()
    entry = KeyEntry(keyid=key_id(new.public_key()), public=public_key_to_b64(new.public_key()))
    revoked = list(ring.extra.get("revoked", [])) if ring else []
    if revoke:
        revoked.append(key_id(old.public_key()))
    new_ring = Keyring(
        fleet=fleet, version=(ring.version if ring else 0) + 1, threshold=1,
        keys=(entry,),
        issued_at=time.time() if now is None else now,
        extra={"revoked": revoked} if revoked else {},
    )
    _retire(home, "signing", old)
    atomic_write(home.keys / "signing.pem", _pem(new), mode=0o600)
    _write_ring(home, new_ring, home.root_key())
    return new_ring


def rotate_root(home: HubHome, *, reset_seq: bool = False, now: float | None = None) -> int:
    """New root key N+1 signed by old and new; keyring re-signed. Returns the new root version."""
    fleet = home.config().fleet
    chain = _chain(home)
    version = len(chain) + 2
    old, new = home.root_key(), Ed25519PrivateKey.generate()
    rot = RootRotation(fleet=fleet, version=version, public=public_key_to_b64(new.public_key()),
                       reset_seq=reset_seq)
    chain.append(sign_envelope(rot.to_dict(), [old, new]))
    _retire(home, "root", old)
    atomic_write(roots_path(home), roots_message(chain), mode=0o600)
    atomic_write(home.keys / "root.pem", _pem(new), mode=0o600)
    if reset_seq:  # a state signed by the old signing key must not be replayable from seq 1
        rotate_signing(home, revoke=True, now=now)
    elif keyring_path(home).exists():
        ring = _current_ring(home)
        bumped = Keyring(fleet=ring.fleet, version=ring.version + 1, keys=ring.keys,
                         threshold=ring.threshold, issued_at=time.time() if now is None else now,
                         extra=ring.extra)
        _write_ring(home, bumped, new)
    return version


def show_keys(home: HubHome) -> dict[str, Any]:
    ring = _current_ring(home) if keyring_path(home).exists() else None
    return {
        "root_keyid": key_id(home.root_key().public_key()),
        "root_version": len(_chain(home)) + 1,
        "keyring_version": ring.version if ring else None,
        "signing_keys": [k.keyid for k in ring.keys] if ring else [],
        "revoked": list(ring.extra.get("revoked", [])) if ring else [],
        "threshold": ring.threshold if ring else None,
    }


def _cmd_keys(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    if args.action == "rotate-signing":
        ring = rotate_signing(home, revoke=not args.keep_old)
        print(f"keyring v{ring.version}: signing key {ring.keys[0].keyid[:16]}…"
              + ("" if args.keep_old else " (old key revoked)")
              + "; restart `edgefleet-hub serve` to publish it")
    elif args.action == "rotate-root":
        version = rotate_root(home, reset_seq=args.reset_seq)
        print(f"root v{version} written to {roots_path(home)} (signed by the old and the new root"
              f"{'; seq reset and signing key rotated' if args.reset_seq else ''}); "
              "restart `edgefleet-hub serve` to publish it. Keep the new root.pem offline.")
    else:
        info = show_keys(home)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                print(f"{k:16} {v}")
    return 0


def add_keys_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``edgefleet-hub keys {show,rotate-signing,rotate-root}``."""
    sp = cmd("keys", _cmd_keys, "show or rotate the fleet's keys (run while the hub is stopped)")
    sp.add_argument("action", nargs="?", choices=["show", "rotate-signing", "rotate-root"],
                    default="show")
    sp.add_argument("--keep-old", action="store_true",
                    help="rotate-signing: keep the old key valid instead of revoking it")
    sp.add_argument("--reset-seq", action="store_true",
                    help="rotate-root: let devices accept lower seq values again (recovery from a "
                         "stolen signing key); also rotates the signing key")
    sp.add_argument("--json", action="store_true", help="machine-readable output (show)")
