"""Key ceremonies on a hub home: rotate the signing key, rotate the root key, renew the keyring,
show the keys.

Files under ``DIR/keys/``::

    root.pub                the current root public key: all the daemon and enrolment need
    root.pem                the current root private key, unless it is kept offline (then every
                            ceremony that signs with it takes ``--root-key PATH``)
    signing.pem             the signing key (online: the daemon signs desired states with it)
    keyring.json            the root-signed keyring the daemon publishes (retained)
    roots.json              the chain of root rotations (``edgefleet.roots/v1``), published retained
    retired/                every replaced signing key, named by key id (kept for audit); a replaced
                            root key is retired beside the root key file, in ``retired/`` there

A signing-key rotation writes keyring version N+1 listing the new key, and by default revokes the
old one (devices then refuse anything it signs). A root rotation signs root version N+1 with the
old *and* the new root key, appends it to the chain, and re-signs the keyring with the new root;
``--reset-seq`` also lets devices accept lower ``seq`` values again (recovery from a stolen
signing key that pushed ``seq`` up) and therefore also rotates the signing key. A renewal re-signs
the keyring as it is, as version N+1. Every keyring a ceremony signs expires after
``--lifetime-days`` (default :data:`hub.core.desired.KEYRING_LIFETIME_DAYS`, a year); the daemon
warns ahead (``hub/alerts``, ``edgefleet-hub status``). Devices need no re-provisioning. The root private key is
read only here, from ``--root-key`` or ``DIR/keys/root.pem``, and must match ``root.pub``. The
daemon loads keys at start: restart it (``edgefleet-hub serve``) to publish.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.adapters.store import atomic_write
from edgefleet.agent.contract.envelope import (
    key_id,
    open_envelope,
    public_key_from_b64,
    public_key_to_b64,
    sign_envelope,
)
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import KeyEntry, Keyring, format_time, parse_json_object
from edgefleet.agent.core.trust import RootRotation, roots_message
from edgefleet.hub.adapters.home import HubHome, keyring_path, private_pem
from edgefleet.hub.core.desired import KEYRING_LIFETIME_DAYS, KEYRING_RENEW_DAYS

__all__ = ["add_keys_commands", "renew_keyring", "roots_path", "rotate_root", "rotate_signing", "show_keys"]

MAX_LIFETIME_DAYS = 3650  # a keyring valid for more than ten years would not expire in practice


def roots_path(home: HubHome) -> Path:
    return home.keys / "roots.json"


def _retire(folder: Path, name: str, key: Ed25519PrivateKey) -> None:
    retired = folder / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    atomic_write(retired / f"{name}-{key_id(key.public_key())[:16]}.pem", private_pem(key), mode=0o600)


def _current_ring(home: HubHome) -> Keyring | None:
    path = keyring_path(home)
    if not path.exists():
        return None
    return Keyring.from_dict(parse_json_object(open_envelope(path.read_bytes()).payload, "keyring"))


def _chain(home: HubHome) -> list[bytes]:
    path = roots_path(home)
    if not path.exists():
        return []
    return [c.encode() for c in json.loads(path.read_text())["chain"]]


def _write_ring(home: HubHome, ring: Keyring, root: Ed25519PrivateKey) -> None:
    atomic_write(keyring_path(home), sign_envelope(ring.to_dict(), [root]), mode=0o600)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _expiry(now: float, lifetime_days: float) -> float:
    if not 1 <= lifetime_days <= MAX_LIFETIME_DAYS:
        raise ConfigError(f"a keyring lifetime is 1 to {MAX_LIFETIME_DAYS} days, got {lifetime_days:g}")
    return now + lifetime_days * 86400


def rotate_signing(home: HubHome, *, revoke: bool = True, now: float | None = None,
                   root_key: Path | None = None, lifetime_days: float = KEYRING_LIFETIME_DAYS) -> Keyring:
    """New signing key; keyring N+1 lists only it (and revokes the old one unless told not).
    Signed by the root key at ``root_key`` (default ``DIR/keys/root.pem``); expires
    ``lifetime_days`` from now."""
    fleet = home.config().fleet
    now = _now(now)
    expires = _expiry(now, lifetime_days)
    root = home.root_key(root_key)  # before anything changes: no key, no ceremony
    ring = _current_ring(home)
    old = home.signing_key()
    new = Ed25519PrivateKey.generate()
    entry = KeyEntry(keyid=key_id(new.public_key()), public=public_key_to_b64(new.public_key()))
    revoked = list(ring.extra.get("revoked", [])) if ring else []
    if revoke:
        revoked.append(key_id(old.public_key()))
    new_ring = Keyring(
        fleet=fleet, version=(ring.version if ring else 0) + 1, threshold=1,
        keys=(entry,),
        issued_at=now,
        extra={"revoked": revoked} if revoked else {},
        expires_at=expires,
    )
    _retire(home.keys, "signing", old)
    atomic_write(home.signing_key_path, private_pem(new), mode=0o600)
    _write_ring(home, new_ring, root)
    return new_ring


def rotate_root(home: HubHome, *, reset_seq: bool = False, now: float | None = None,
                root_key: Path | None = None, new_root_key: Path | None = None,
                lifetime_days: float = KEYRING_LIFETIME_DAYS) -> int:
    """New root key N+1 signed by old and new; keyring re-signed. Returns the new root version.

    The current root key is read from ``root_key`` (default ``DIR/keys/root.pem``); the new one
    is written to ``new_root_key`` (default: the same file, the old key retired into
    ``retired/`` beside it), so a root kept offline stays offline."""
    fleet = home.config().fleet
    now = _now(now)
    expires = _expiry(now, lifetime_days)
    old = home.root_key(root_key)
    dest = new_root_key or root_key or home.root_key_path
    chain = _chain(home)
    version = len(chain) + 2
    new = Ed25519PrivateKey.generate()
    rot = RootRotation(fleet=fleet, version=version, public=public_key_to_b64(new.public_key()),
                       reset_seq=reset_seq)
    chain.append(sign_envelope(rot.to_dict(), [old, new]))
    # The new private key is on disk before anything names it; the old one stays retired.
    _retire((root_key or home.root_key_path).parent, "root", old)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(dest, private_pem(new), mode=0o600)
    atomic_write(roots_path(home), roots_message(chain), mode=0o600)
    home.set_root_public(new.public_key())
    if reset_seq:  # a state signed by the old signing key must not be replayable from seq 1
        rotate_signing(home, revoke=True, now=now, root_key=dest, lifetime_days=lifetime_days)
    else:
        ring = _current_ring(home)
        if ring is not None:
            bumped = Keyring(fleet=ring.fleet, version=ring.version + 1, keys=ring.keys,
                             threshold=ring.threshold, issued_at=now, extra=ring.extra, expires_at=expires)
            _write_ring(home, bumped, new)
    return version


def renew_keyring(home: HubHome, *, now: float | None = None, root_key: Path | None = None,
                  lifetime_days: float = KEYRING_LIFETIME_DAYS) -> Keyring:
    """Re-sign the keyring as it is (same keys, threshold and revocations) as version N+1,
    expiring ``lifetime_days`` from now; a home without a keyring gets version 1 listing its
    signing key."""
    fleet = home.config().fleet
    now = _now(now)
    expires = _expiry(now, lifetime_days)
    root = home.root_key(root_key)
    ring = _current_ring(home)
    if ring is None:
        signer = home.signing_key().public_key()
        ring = Keyring(fleet=fleet, version=0, threshold=1,
                       keys=(KeyEntry(keyid=key_id(signer), public=public_key_to_b64(signer)),))
    renewed = Keyring(fleet=fleet, version=ring.version + 1, keys=ring.keys, threshold=ring.threshold,
                      issued_at=now, extra=ring.extra, expires_at=expires)
    _write_ring(home, renewed, root)
    return renewed


def show_keys(home: HubHome) -> dict[str, Any]:
    ring = _current_ring(home)
    return {
        "root_keyid": key_id(public_key_from_b64(home.root_public_b64())),
        "root_version": len(_chain(home)) + 1,
        "root_private_key": "in the hub home" if home.root_key_path.exists() else "offline",
        "keyring_version": ring.version if ring else None,
        "keyring_expires_at": format_time(ring.expires_at) if ring and ring.expires_at else None,
        "signing_keys": [k.keyid for k in ring.keys] if ring else [],
        "revoked": list(ring.extra.get("revoked", [])) if ring else [],
        "threshold": ring.threshold if ring else None,
    }


def _cmd_keys(args: argparse.Namespace) -> int:
    home = HubHome(Path(args.home))
    root_key = Path(args.root_key) if args.root_key else None
    life = args.lifetime_days
    publish = "restart `edgefleet-hub serve` to publish it"
    if args.action == "rotate-signing":
        ring = rotate_signing(home, revoke=not args.keep_old, root_key=root_key, lifetime_days=life)
        print(f"keyring v{ring.version}: signing key {ring.keys[0].keyid[:16]}…"
              + ("" if args.keep_old else " (old key revoked)") + f"; {publish}")
    elif args.action == "rotate-root":
        new_key = Path(args.new_root_key) if args.new_root_key else None
        version = rotate_root(home, reset_seq=args.reset_seq, root_key=root_key, new_root_key=new_key,
                              lifetime_days=life)
        where = new_key or root_key or home.root_key_path
        print(f"root v{version} written to {roots_path(home)} (signed by the old and the new root"
              f"{'; seq reset and signing key rotated' if args.reset_seq else ''}); {publish}. "
              f"The new root private key is {where}: keep it offline.")
    elif args.action == "renew-keyring":
        ring = renew_keyring(home, root_key=root_key, lifetime_days=life)
        print(f"keyring v{ring.version} re-signed by the root key, valid until "
              f"{format_time(ring.expires_at or 0.0)}; {publish}")
    else:
        info = show_keys(home)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k, v in info.items():
                print(f"{k:16} {v}")
    return 0


def add_keys_commands(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``edgefleet-hub keys {show,rotate-signing,rotate-root,renew-keyring}``."""
    sp = cmd("keys", _cmd_keys, "show or rotate the fleet's keys (run while the hub is stopped)")
    sp.add_argument("action", nargs="?", choices=["show", "rotate-signing", "rotate-root", "renew-keyring"],
                    default="show")
    sp.add_argument("--root-key", metavar="PATH",
                    help="the root private key these ceremonies sign with (default HOME/keys/root.pem; "
                         "give its offline location when it is not in the hub home)")
    sp.add_argument("--new-root-key", metavar="PATH",
                    help="rotate-root: where to write the new root private key (default: replace "
                         "--root-key, the old key kept in retired/ beside it)")
    sp.add_argument("--lifetime-days", type=float, default=KEYRING_LIFETIME_DAYS, metavar="DAYS",
                    help=f"how long the keyring a ceremony signs is valid (default {KEYRING_LIFETIME_DAYS}; "
                         f"the hub warns {KEYRING_RENEW_DAYS} days before it expires)")
    sp.add_argument("--keep-old", action="store_true",
                    help="rotate-signing: keep the old key valid instead of revoking it")
    sp.add_argument("--reset-seq", action="store_true",
                    help="rotate-root: let devices accept lower seq values again (recovery from a "
                         "stolen signing key); also rotates the signing key")
    sp.add_argument("--json", action="store_true", help="machine-readable output (show)")
