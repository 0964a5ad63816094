"""Hub key ceremonies (``edgefleet-hub keys ...``) produce what a device accepts: a rotated and
revoked signing key, a rotated root (N -> N+1, signed by both), a seq reset by root rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.agent.contract.envelope import public_key_from_b64, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.errors import ConfigError, UnknownKey
from edgefleet.agent.contract.wire import DesiredState
from edgefleet.agent.core.trust import TrustedState
from edgefleet.hub.adapters.home import HubHome, keyring_path, load_private_key
from edgefleet.hub.core.desired import build_keyring
from edgefleet.hub.services.keys import renew_keyring, roots_path, rotate_root, rotate_signing, show_keys
from tests.conftest import run_cli

NOW = 1_800_000_000.0


def desired(home: HubHome, seq: int, key: object = None) -> bytes:
    state = DesiredState(fleet="f1", device="d1", seq=seq, issued_at=NOW, expires_at=NOW + 60,
                         models={})
    return sign_envelope(state.to_dict(), [key or home.signing_key()])


@pytest.fixture
def home(tmp_path: Path) -> HubHome:
    h = HubHome(tmp_path / "hub")
    h.init(fleet="f1", broker_url="mqtt://127.0.0.1:1", http_listen="127.0.0.1:0")
    keyring_path(h).write_bytes(build_keyring("f1", 1, [h.signing_key()], h.root_key(), NOW))
    return h


def device(home: HubHome) -> TrustedState:
    t = TrustedState(root=public_key_from_b64(home.root_public_b64()), fleet="f1", device="d1")
    t.update_keyring(keyring_path(home).read_bytes())
    return t


def test_signing_rotation_revokes_the_old_key(home: HubHome) -> None:
    dev = device(home)
    old = home.signing_key()
    ring = rotate_signing(home, now=NOW)
    assert ring.version == 2
    assert dev.update_keyring(keyring_path(home).read_bytes()) is not None
    with pytest.raises(UnknownKey) as exc:
        dev.check_desired(desired(home, 1, old), now=NOW)
    assert exc.value.reason == "revoked_key"
    assert dev.check_desired(desired(home, 1), now=NOW) is not None


def test_root_rotation_is_accepted_and_resets_seq_only_when_asked(home: HubHome) -> None:
    dev = device(home)
    dev.mark_applied(dev.check_desired(desired(home, 7), now=NOW))  # type: ignore[arg-type]
    assert rotate_root(home, now=NOW) == 2
    assert [r.version for r in dev.update_roots(roots_path(home).read_bytes())] == [2]
    assert dev.keyring is None  # signed by root 1: the device waits for the re-signed one
    dev.update_keyring(keyring_path(home).read_bytes())
    assert dev.last_seq == 7
    assert rotate_root(home, reset_seq=True, now=NOW) == 3
    assert [r.version for r in dev.update_roots(roots_path(home).read_bytes())] == [3]
    assert dev.last_seq == 0
    dev.update_keyring(keyring_path(home).read_bytes())
    assert dev.check_desired(desired(home, 1), now=NOW) is not None


def test_keys_cli(home: HubHome) -> None:
    run_cli("edgefleet.hub.cli.main", "keys", "rotate-signing", "--home", str(home.path))
    run_cli("edgefleet.hub.cli.main", "keys", "rotate-root", "--home", str(home.path))
    info = json.loads(run_cli("edgefleet.hub.cli.main", "keys", "show", "--home", str(home.path), "--json").stdout)
    assert info["root_version"] == 2 and info["keyring_version"] == 3
    assert len(info["revoked"]) == 1 and len(info["signing_keys"]) == 1


def test_ceremonies_with_the_root_key_offline(home: HubHome, tmp_path: Path) -> None:
    """The root private key lives on removable media: every ceremony that signs with it takes
    its path, the new root key is written there too (the old one retired beside it), and the
    hub home keeps only the public half."""
    media = tmp_path / "usb"
    media.mkdir()
    offline = media / "root.pem"
    (home.keys / "root.pem").rename(offline)
    dev = device(home)
    before = keyring_path(home).read_bytes()
    with pytest.raises(ConfigError, match="--root-key"):
        rotate_signing(home, now=NOW)
    with pytest.raises(ConfigError, match="not this fleet's current root key"):
        rotate_root(home, now=NOW, root_key=home.keys / "signing.pem")
    assert keyring_path(home).read_bytes() == before and not roots_path(home).exists()  # nothing changed
    old_pub = home.root_public_b64()
    assert rotate_root(home, now=NOW, root_key=offline) == 2
    assert not (home.keys / "root.pem").exists() and list((media / "retired").iterdir())
    assert home.root_public_b64() != old_pub == public_key_to_b64(
        load_private_key(next((media / "retired").iterdir())).public_key())
    assert home.root_public_b64() == public_key_to_b64(load_private_key(offline).public_key())
    assert [r.version for r in dev.update_roots(roots_path(home).read_bytes())] == [2]
    dev.update_keyring(keyring_path(home).read_bytes())
    ring = rotate_signing(home, now=NOW, root_key=offline)
    assert dev.update_keyring(keyring_path(home).read_bytes()) == ring
    renewed = renew_keyring(home, now=NOW + 1, root_key=offline)
    assert (renewed.version, renewed.keys, renewed.extra) == (ring.version + 1, ring.keys, ring.extra)
    assert dev.update_keyring(keyring_path(home).read_bytes()) == renewed
    assert dev.check_desired(desired(home, 1), now=NOW) is not None
    info = show_keys(home)
    assert info["root_private_key"] == "offline" and info["root_version"] == 2


def test_rotate_root_can_write_the_new_key_elsewhere(home: HubHome, tmp_path: Path) -> None:
    new = tmp_path / "vault" / "root-v2.pem"
    assert run_cli("edgefleet.hub.cli.main", "keys", "rotate-root", "--home", str(home.path),
                   "--new-root-key", str(new)).returncode == 0
    assert home.root_public_b64() == public_key_to_b64(load_private_key(new).public_key())
    assert new.stat().st_mode & 0o077 == 0


def test_renew_keyring_cli_sets_the_lifetime_and_refuses_a_silly_one(home: HubHome) -> None:
    bad = run_cli("edgefleet.hub.cli.main", "keys", "renew-keyring", "--home", str(home.path),
                  "--lifetime-days", "0", check=False)
    assert bad.returncode == 2 and "lifetime is 1 to 3650 days, got 0" in bad.stderr
    out = run_cli("edgefleet.hub.cli.main", "keys", "renew-keyring", "--home", str(home.path),
                  "--lifetime-days", "90").stdout
    assert "keyring v2 re-signed by the root key, valid until" in out
    info = json.loads(run_cli("edgefleet.hub.cli.main", "keys", "show", "--home", str(home.path), "--json").stdout)
    assert info["keyring_version"] == 2 and info["keyring_expires_at"]
