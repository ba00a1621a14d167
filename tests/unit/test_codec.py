import msgspec
import pytest

from torchloom.errors import DecodeError
from torchloom.protocol import (
    MAX_MESSAGE_BYTES,
    ControlRequest,
    DesiredConfig,
    MetricPoint,
    Telemetry,
    decode,
    encode,
    from_builtins,
    to_builtins,
)
from torchloom.protocol.config import resolve_values, select_snapshot
from torchloom.protocol.messages import ConfigSnapshot


def tel(**kw):
    base = dict(job_id="j", replica_id="0", rank=1, ts=1.0, step=5)
    base.update(kw)
    return Telemetry(**base)


def test_roundtrip_keeps_every_field():
    msg = tel(
        points=[MetricPoint(step=5, ts=1.0, values={"loss": 0.5, "nan": None})], dropped_points=3
    )
    assert decode(encode(msg), Telemetry) == msg


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1,2,3]",
        b'{"job_id": "j"}',
        b'{"v":1,"job_id":5,"replica_id":"0","rank":0,"ts":1,"step":1}',
    ],
)
def test_malformed_payloads_raise_decode_error(payload):
    with pytest.raises(DecodeError):
        decode(payload, Telemetry)


def test_wrong_schema_version_is_refused():
    raw = msgspec.json.encode({**to_builtins(tel()), "v": 99})
    with pytest.raises(DecodeError, match="schema version 99"):
        decode(raw, Telemetry)


def test_oversized_payload_is_refused_before_parsing():
    raw = b" " * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(DecodeError, match="over the"):
        decode(raw, ControlRequest)


def test_unknown_op_is_refused():
    with pytest.raises(DecodeError):
        decode(b'{"op": "format_disk", "job_id": "j"}', ControlRequest)


def test_from_builtins_validates():
    doc = DesiredConfig(
        job_id="j", snapshots=[ConfigSnapshot(version=1, effective_step=0, values={"lr": 0.1})]
    )
    assert from_builtins(to_builtins(doc), DesiredConfig) == doc
    with pytest.raises(DecodeError):
        from_builtins({"job_id": 3}, DesiredConfig)


def snaps(*pairs):
    return [ConfigSnapshot(version=v, effective_step=s, values={"v": v}) for v, s in pairs]


def test_select_snapshot_takes_newest_in_force():
    s = snaps((1, 0), (2, 100), (3, 100), (4, 150))
    assert select_snapshot(s, 0).version == 1
    assert select_snapshot(s, 99).version == 1
    assert select_snapshot(s, 100).version == 3  # two versions at one step: the newer wins
    assert select_snapshot(s, 149).version == 3
    assert select_snapshot(s, 10**9).version == 4
    assert select_snapshot(snaps((5, 10)), 9) is None


def test_resolve_values_applies_replica_overrides():
    snap = ConfigSnapshot(
        version=2,
        effective_step=0,
        values={"lr": 0.1, "batch_size": 64},
        overrides={"1": {"batch_size": 32}},
    )
    assert resolve_values(snap, "0") == {"lr": 0.1, "batch_size": 64}
    assert resolve_values(snap, "1") == {"lr": 0.1, "batch_size": 32}
