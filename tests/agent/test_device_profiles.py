"""Device profiles and the agent config's strictness: every shipped profile loads, unknown keys
are named, per-device overrides apply, missing execution providers fall back to the next one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.app.serving import load, providers_for
from edgefleet.agent.contract.config import load_agent_config, load_profile
from edgefleet.agent.contract.errors import ConfigError
from edgefleet.agent.contract.wire import ModelEntry
from edgefleet.hub.cli.bundle import RUNTIME_OVERHEAD_MB, systemd_dropin
from tests.conftest import REPO

PROFILES = REPO / "device-profiles"
SHIPPED = sorted(PROFILES.glob("*.toml"))


def test_the_promised_device_classes_have_profiles() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "raspberry-pi-4",
        "raspberry-pi-5",
        "jetson-orin-nano",
        "generic-x86_64",
        "tiny-arm-512mb",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_loads_and_can_always_fall_back_to_the_cpu(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.execution_providers[-1] == "CPUExecutionProvider"
    use, _missing = providers_for(profile)
    assert use, "a profile must always leave ONNX Runtime something to run on"
    assert profile.memory_budget_mb > 0 and profile.max_blob_mb > 0 and profile.spool_mb > 0


def test_tiny_board_profile_fits_one_core_and_512_mb() -> None:
    tiny = load_profile(PROFILES / "tiny-arm-512mb.toml")
    assert tiny.intra_op_threads == 1 and tiny.inter_op_threads == 1
    assert tiny.memory_budget_mb + RUNTIME_OVERHEAD_MB < 512
    assert tiny.max_blob_mb <= tiny.memory_budget_mb


def test_jetson_asks_for_tensorrt_then_cuda_and_falls_back_to_cpu_without_them() -> None:
    jetson = load_profile(PROFILES / "jetson-orin-nano.toml")
    assert jetson.execution_providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert jetson.provider_options["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    available = set(ort.get_available_providers())
    use, missing = providers_for(jetson)
    names = [u if isinstance(u, str) else u[0] for u in use]
    assert names == [p for p in jetson.execution_providers if p in available]
    assert missing == [p for p in jetson.execution_providers if p not in available]


def test_unknown_profile_key_is_an_error_naming_it(tmp_path: Path) -> None:
    text = (PROFILES / "raspberry-pi-4.toml").read_text().replace("max_blob_mb", "max_blob_mbytes")
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError, match="max_blob_mbytes"):
        load_profile(tmp_path / "p.toml")
    (tmp_path / "q.toml").write_text('[profile]\nname = "q"\n[gpu]\ncores = 2\n')
    with pytest.raises(ConfigError, match="'gpu'"):
        load_profile(tmp_path / "q.toml")


def _agent_toml(tmp_path: Path, extra: str = "", url: str = "mqtt://127.0.0.1:1883") -> Path:
    (tmp_path / "profile.toml").write_text((PROFILES / "raspberry-pi-5.toml").read_text())
    path = tmp_path / "agent.toml"
    path.write_text(
        f'fleet = "f"\ndevice = "d1"\nbroker_url = "{url}"\nblob_url = "http://h:1"\n'
        f'root_public_key = "AAAA"\nprofile = "profile.toml"\n{extra}'
    )
    return path


def test_per_device_overrides_apply_and_unknown_override_keys_are_named(tmp_path: Path) -> None:
    cfg = load_agent_config(_agent_toml(tmp_path, "[overrides.limits]\nlatency_slo_ms = 7\n"))
    assert cfg.profile.latency_slo_ms == 7.0 and cfg.profile.name == "raspberry-pi-5"
    with pytest.raises(ConfigError, match="latency_slo"):
        load_agent_config(_agent_toml(tmp_path, "[overrides.limits]\nlatency_slo = 7\n"))


def test_broker_credentials_in_agent_toml_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        load_agent_config(_agent_toml(tmp_path, 'ca_file = "missing.pem"\n', url="mqtts://h:8883"))
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="mqtts://"):
        load_agent_config(_agent_toml(tmp_path, 'ca_file = "ca.pem"\n'))
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_agent_config(_agent_toml(tmp_path, 'cert_file = "c.pem"\n', url="mqtts://h:8883"))
    (tmp_path / "pw").write_text("hunter2\n")
    cfg = load_agent_config(
        _agent_toml(tmp_path, 'ca_file = "ca.pem"\npassword_file = "pw"\n', url="mqtts://h:8883")
    )
    assert cfg.mqtt_options() == {
        "ca_file": str(tmp_path / "ca.pem"),
        "cert_file": None,
        "key_file": None,
        "username": "d1",
        "password": "hunter2",
    }


def test_systemd_dropin_sizes_memory_from_the_profile() -> None:
    pi4 = load_profile(PROFILES / "raspberry-pi-4.toml")
    text = systemd_dropin(pi4)
    assert "[Service]\n" in text
    assert f"MemoryMax={pi4.memory_budget_mb + RUNTIME_OVERHEAD_MB}M" in text


def test_a_session_reports_the_providers_it_fell_back_from(tmp_path: Path) -> None:
    """What the daemon's `provider_fallback` event is built from: the providers the profile
    asked for that the real session does not use."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [3.0, 3.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "w"], ["y"])],
        "triple",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data)
    entry = ModelEntry(
        version="1", sha256=hashlib.sha256(data).hexdigest(), size=len(data), url="x"
    )
    jetson = load_profile(PROFILES / "jetson-orin-nano.toml")
    loaded = load("m", entry, tmp_path / "m.onnx", jetson)
    used = loaded.session.get_providers()
    assert loaded.missing_providers == tuple(p for p in jetson.execution_providers if p not in used)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert loaded.missing_providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    out = loaded.session.run(None, {"input": np.ones((1, 2), dtype=np.float32)})
    assert out[0].tolist() == [[3.0, 3.0]]
    plain = load("m", entry, tmp_path / "m.onnx", load_profile(PROFILES / "generic-x86_64.toml"))
    assert plain.missing_providers == ()
