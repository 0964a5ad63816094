"""An in-memory hub for testing the agent's update core, in the spirit of python-tuf's
``RepositorySimulator``: it signs on demand, rotates root and signing keys, revokes keys, and
serves blobs over a real HTTP server on 127.0.0.1 that records every request (with its ``Range``
header) and can misbehave on purpose:

    ok       serve the bytes (honouring ``Range``)
    endless  keep sending bytes after the declared size
    wrong    serve other bytes of the same length
    drip     send one small chunk per ``drip_delay`` seconds (slow retrieval)
    cut      close the connection after ``cut_at`` bytes, once; then behave
    error    answer HTTP 500

No hub code is used: the simulator builds messages with the wire contract (``agent.contract.wire``,
``agent.contract.envelope``) so it tests the agent against the contract, not against the hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.adapters.fetch import HttpFetcher
from edgefleet.agent.adapters.store import Store
from edgefleet.agent.app.serving import ModelServer
from edgefleet.agent.app.updater import Updater
from edgefleet.agent.contract.config import AgentConfig, DeviceProfile, load_agent_config
from edgefleet.agent.contract.envelope import key_id, public_key_from_b64, public_key_to_b64, sign_envelope
from edgefleet.agent.contract.wire import DesiredState, KeyEntry, Keyring, ModelEntry, TensorSpec
from edgefleet.agent.core.trust import RootRotation, TrustedState, roots_message
from edgefleet.agent.core.update import Note
from tests.conftest import REPO, free_port


def tiny_model(scale: float, *, opset: int = 17, domain_op: tuple[str, str] | None = None) -> bytes:
    """``y = x * scale`` on float[?, 2]: each version answers differently, so a test can tell
    which one is serving. ``domain_op`` = (domain, op) swaps in a node outside the allow-list."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [2], [scale, scale])
    if domain_op is None:
        node = helper.make_node("Mul", ["x", "c"], ["y"], name="mul")
        opsets = [helper.make_opsetid("", opset)]
    else:
        node = helper.make_node(domain_op[1], ["x", "c"], ["y"], name="custom", domain=domain_op[0])
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(domain_op[0], 1)]
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgefleet-tests")
    model.ir_version = 8
    return model.SerializeToString()


def external_data_model() -> bytes:
    """A model whose initializer points at a file beside it (a path-traversal vector)."""
    model = onnx.load_model_from_string(tiny_model(1.0))
    t = model.graph.initializer[0]
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../etc/passwd"), ("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return model.SerializeToString()


# --- blob server ------------------------------------------------------------------------------


@functools.cache
def _gzip_bomb(body: bytes) -> bytes:
    """``body`` then 64 MiB of zeros, gzip'd once per body (about 64 KiB). ``put`` makes it ahead
    of the request: compressing takes longer than a test fetcher's read timeout on a loaded machine."""
    import zlib

    z = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container
    chunk = b"\0" * 2**20
    parts = [z.compress(body)] + [z.compress(chunk) for _ in range(64)]
    return b"".join([*parts, z.flush()])


@dataclass
class Blob:
    data: bytes
    mode: str = "ok"
    cut_at: int = 0
    drip_delay: float = 0.2


class BlobServer:
    """A real HTTP server on 127.0.0.1 with recorded requests and chosen misbehaviour."""

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.encodings: list[str | None] = []  # Accept-Encoding per request
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                server.encodings.append(self.headers.get("Accept-Encoding"))
                blob = server.blobs.get(self.path)
                if blob is None or blob.mode == "error":
                    self.send_error(404 if blob is None else 500)
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server._serve(self, blob)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            # a short poll: shutdown() waits up to one poll_interval (the default 0.5 s cost every test 0.5 s at teardown)
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="blob-server", daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def put(self, data: bytes, **behaviour: Any) -> str:
        path = f"/blobs/{hashlib.sha256(data).hexdigest()}"
        self.blobs[path] = Blob(data, **behaviour)
        if behaviour.get("mode") == "gzip-bomb":
            _gzip_bomb(data)  # made now, not inside the request
        return path

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: BaseHTTPRequestHandler, blob: Blob) -> None:
        data = blob.data
        if blob.mode == "wrong":
            data = bytes(b ^ 0x5A for b in data)
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-") and blob.mode != "endless":
            start = int(rng[len("bytes=") : -1])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        if blob.mode == "gzip-bomb":  # a small compressed body that inflates far past the signed size
            bomb = _gzip_bomb(body)
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(bomb)))
            h.end_headers()
            h.wfile.write(bomb)
            return
        if blob.mode == "endless":
            h.end_headers()  # no Content-Length: the stream just goes on
            h.wfile.write(body)
            while not self._stop.is_set():
                h.wfile.write(b"\0" * 65536)
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if blob.mode == "cut":
            h.wfile.write(body[: blob.cut_at])
            h.wfile.flush()
            blob.mode = "ok"
            h.close_connection = True
            return
        if blob.mode == "drip":
            for i in range(0, len(body), 16):
                if self._stop.is_set():
                    return
                h.wfile.write(body[i : i + 16])
                h.wfile.flush()
                time.sleep(blob.drip_delay)
            return
        h.wfile.write(body)


# --- hub --------------------------------------------------------------------------------------


@dataclass
class HubSimulator:
    """Signs keyrings, root rotations and desired states for one fleet/device on demand."""

    fleet: str = "simfleet"
    device: str = "dev1"
    now: float = field(default_factory=lambda: float(int(time.time())))  # real agents check issued_at against their clock
    ttl: float = 3600.0
    root: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    signers: list[Ed25519PrivateKey] = field(default_factory=lambda: [Ed25519PrivateKey.generate()])
    threshold: int = 1
    keyring_version: int = 1
    root_version: int = 1
    revoked: list[str] = field(default_factory=list)
    chain: list[bytes] = field(default_factory=list)
    seq: int = 0
    server: BlobServer = field(default_factory=BlobServer)
    provisioned_root: str = ""  # what the device was provisioned with (root version 1)

    def __post_init__(self) -> None:
        self.provisioned_root = self.provisioned_root or self.root_public

    @property
    def root_public(self) -> str:
        return public_key_to_b64(self.root.public_key())

    # -- keys --

    def keyring(self, *, sign_with: Ed25519PrivateKey | None = None) -> bytes:
        ring = Keyring(
            fleet=self.fleet,
            version=self.keyring_version,
            threshold=self.threshold,
            keys=tuple(
                KeyEntry(keyid=key_id(k.public_key()), public=public_key_to_b64(k.public_key()))
                for k in self.signers
            ),
            issued_at=self.now,
            extra={"revoked": list(self.revoked)} if self.revoked else {},
        )
        return sign_envelope(ring.to_dict(), [sign_with or self.root])

    def rotate_signing(self, *, revoke_old: bool = True) -> Ed25519PrivateKey:
        """Replace every signing key by a fresh one in keyring version N+1."""
        new = Ed25519PrivateKey.generate()
        if revoke_old:
            self.revoked += [key_id(k.public_key()) for k in self.signers]
        self.signers = [new]
        self.keyring_version += 1
        return new

    def rotate_root(
        self,
        *,
        reset_seq: bool = False,
        sign_old: bool = True,
        sign_new: bool = True,
        version: int | None = None,
    ) -> bytes:
        """A rotation envelope for root N+1 (also appended to :attr:`chain` and adopted)."""
        new = Ed25519PrivateKey.generate()
        rot = RootRotation(
            fleet=self.fleet,
            version=version or self.root_version + 1,
            public=public_key_to_b64(new.public_key()),
            reset_seq=reset_seq,
        )
        keys = [k for k, use in ((self.root, sign_old), (new, sign_new)) if use]
        raw = sign_envelope(rot.to_dict(), keys)
        if sign_old and sign_new and version is None:
            self.root, self.root_version = new, rot.version
            self.chain.append(raw)
        return raw

    def roots(self) -> bytes:
        return roots_message(self.chain)

    # -- desired states --

    def entry(
        self, version: str, data: bytes, *, size: int | None = None, **behaviour: Any
    ) -> ModelEntry:
        path = self.server.put(data, **behaviour)
        return ModelEntry(
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            size=size or len(data),
            url=self.server.url(path),
            inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 2)),),
            outputs=(TensorSpec(name="y", dtype="float32", shape=(None, 2)),),
        )

    def desired(
        self,
        models: dict[str, ModelEntry],
        *,
        seq: int | None = None,
        keys: Iterable[Ed25519PrivateKey] | None = None,
        device: str | None = None,
        expires_at: float | None = None,
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        state = DesiredState(
            fleet=self.fleet,
            device=device or self.device,
            seq=seq,
            issued_at=self.now,
            expires_at=self.now + self.ttl if expires_at is None else expires_at,
            models=models,
        )
        return sign_envelope(state.to_dict(), list(self.signers if keys is None else keys))


# --- the agent side ---------------------------------------------------------------------------


def in_process_agent_config(folder: Path, root_public_key: str, *, fleet: str = "f", device: str = "d1") -> AgentConfig:
    """An ``agent.toml`` (and its profile) for an agent run in the test's own process: a broker
    port nothing listens on, no blob server, state under *folder*, the inference API on a free port."""
    (folder / "profile.toml").write_text((REPO / "device-profiles" / "generic-x86_64.toml").read_text())
    (folder / "agent.toml").write_text(
        f'fleet = "{fleet}"\ndevice = "{device}"\nbroker_url = "mqtt://127.0.0.1:{free_port()}"\n'
        f'blob_url = "http://127.0.0.1:1"\nroot_public_key = "{root_public_key}"\nprofile = "profile.toml"\n'
        'state_dir = "state"\nlisten = "127.0.0.1:0"\n'
    )
    return load_agent_config(folder / "agent.toml")


PROFILE = DeviceProfile(name="sim", max_blob_mb=1, memory_budget_mb=256, intra_op_threads=1)


def make_updater(
    sim: HubSimulator,
    state_dir: Path,
    *,
    fetcher: HttpFetcher | None = None,
    guard: Any = None,
    profile: DeviceProfile = PROFILE,
    restore: bool = True,
    **kw: Any,
) -> Updater:
    """A fresh agent update core on ``state_dir`` (a second call is a restart), restored
    unless ``restore=False`` (then the caller calls ``restore()`` and reads its notes)."""
    trust = TrustedState(
        root=public_key_from_b64(sim.provisioned_root),
        fleet=sim.fleet,
        device=sim.device,
        max_blob_bytes=profile.max_blob_bytes,
    )
    up = Updater(
        store=Store(state_dir),
        trust=trust,
        fetcher=fetcher or HttpFetcher(attempts=2, backoff=0.01, read_timeout=2.0),
        profile=profile,
        server=ModelServer(),
        guard=guard,
        **kw,
    )
    if restore:
        up.restore()
    return up


def serving(up: Updater, name: str = "m") -> tuple[str, float] | None:
    """(version, output scale) of what ``name`` serves, or ``None``; runs a real inference."""
    if name not in up.server.models():
        return None
    res = up.server.infer(name, {"x": np.ones((1, 2), dtype=np.float32)})
    return res.version, float(res.outputs["y"][0, 0])


def reasons(notes: list[Note]) -> list[str]:
    return [n.reason for n in notes if n.reason]


@contextmanager
def simulator() -> Iterator[HubSimulator]:
    sim = HubSimulator()
    try:
        yield sim
    finally:
        sim.server.close()


def heavy_model(mib: int = 16) -> bytes:
    """A valid model with a ``mib`` MiB initializer: its session needs at least that much memory."""
    c = numpy_helper.from_array(np.ones(mib * 2**18, dtype=np.float32), "c")
    nodes = [
        helper.make_node("ReduceSum", ["c"], ["s"], name="sum", keepdims=0),
        helper.make_node("Mul", ["x", "s"], ["y"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
