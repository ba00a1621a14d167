"""Fuzzing (hypothesis) of the message decoders and the control entry point: malformed,
oversized, wrong-version and adversarial input gets a DecodeError or an error reply —
never another exception, never a changed state."""

import copy
import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchloom.errors import DecodeError
from torchloom.protocol import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    ControlReply,
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    JoinInfo,
    RankEvent,
    RegistryEntry,
    Telemetry,
    decode,
    encode,
)
from torchloom.weaver.control import ControlSettings, commit, handle
from torchloom.weaver.ratelimit import RateLimiter
from torchloom.weaver.state import WeaverState

TYPES = [
    Telemetry,
    RankEvent,
    ControlRequest,
    ControlReply,
    DesiredConfig,
    HistoryEvent,
    RegistryEntry,
]
SETTINGS = ControlSettings()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)  # fmt: skip
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)


@FUZZ
@given(data=st.binary(max_size=2048), type_=st.sampled_from(TYPES))
def test_random_bytes_decode_or_raise_decode_error(data, type_):
    try:
        decode(data, type_)
    except DecodeError:
        pass


def _valid_docs():
    return {
        Telemetry: encode(Telemetry(job_id="j", replica_id="0", rank=0, ts=1.0, step=3, seq=1)),
        ControlRequest: encode(ControlRequest(op="set", job_id="j", values={"lr": 0.1})),
        RankEvent: encode(
            RankEvent(job_id="j", replica_id="0", rank=0, ts=1.0, kind="exited", step=3)
        ),
    }


@FUZZ
@given(
    type_=st.sampled_from([Telemetry, ControlRequest, RankEvent]),
    key=st.text(max_size=12),
    value=json_value,
)
def test_a_valid_message_with_one_field_replaced_by_anything(type_, key, value):
    doc = json.loads(_valid_docs()[type_])
    field = key if key else next(iter(doc))
    doc[field if field in doc else sorted(doc)[len(key) % len(doc)]] = value
    try:
        raw = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, OverflowError):
        return
    try:
        decode(raw, type_)
    except DecodeError:
        pass


@FUZZ
@given(v=st.integers().filter(lambda v: v != SCHEMA_VERSION))
def test_another_schema_version_is_refused(v):
    doc = json.loads(_valid_docs()[ControlRequest])
    doc["v"] = v
    with pytest.raises(DecodeError, match=r"schema version|Expected"):
        decode(json.dumps(doc).encode(), ControlRequest)


def test_oversized_and_deeply_nested_messages_are_refused():
    big = b'{"v":1,"op":"set","job_id":"j","values":{"x":"' + b"a" * MAX_MESSAGE_BYTES + b'"}}'
    with pytest.raises(DecodeError, match="limit"):
        decode(big, ControlRequest)
    deep = b'{"v":1,"op":"set","job_id":"j","values":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    with pytest.raises(DecodeError, match="nested too deeply"):  # was a RecursionError
        decode(deep, ControlRequest)


def _state_with_job():
    s = WeaverState()
    req = ControlRequest(
        op="join", job_id="j",
        join=JoinInfo(replica_id="0", rank=0, pid=1, initial_values={"lr": 0.1, "batch_size": 64}),
    )  # fmt: skip
    out = handle(s, req, 100.0, SETTINGS)
    commit(s, req, out, 100.0)
    return s


ops = st.sampled_from(
    ["join", "set", "pause", "resume", "stop", "drain", "status", "knobs", "policies", "policy"]
)
ids = st.one_of(st.sampled_from(["j", "0", "_", "other"]), st.text(max_size=70))


@FUZZ
@given(
    op=ops,
    job_id=ids,
    replica=st.one_of(st.none(), ids),
    values=st.dictionaries(
        st.one_of(st.sampled_from(["lr", "batch_size", "grad_clip", "sync_every", "global_batch_size"]), st.text(max_size=10)),
        json_value, max_size=4,
    ),
    device=st.one_of(st.none(), st.text(max_size=20)),
    request_id=st.text(max_size=80),
)  # fmt: skip
def test_control_entry_never_raises_and_never_changes_state(
    op, job_id, replica, values, device, request_id
):
    s = _state_with_job()
    before = copy.deepcopy(msgspec.to_builtins(s.jobs["j"].config))
    raw = msgspec.json.encode(
        {"v": 1, "op": op, "job_id": job_id, "replica_id": replica, "values": values,
         "device": device, "request_id": request_id}
    )  # fmt: skip
    try:
        req = decode(raw, ControlRequest)
    except DecodeError:
        return
    out = handle(s, req, 101.0, SETTINGS)
    assert isinstance(out.reply, ControlReply)
    assert out.reply.ok or out.reply.error is not None
    assert msgspec.to_builtins(s.jobs["j"].config) == before  # handle is pure
    if out.new_config is not None:  # what would be stored decodes again
        decode(encode(out.new_config), DesiredConfig)


def test_rate_limiter_holds_a_flood_to_its_rate():
    limiter = RateLimiter(rate_per_s=20.0, burst=50)
    allowed = sum(limiter.allow("script", now=i * 0.001) for i in range(1000))  # 1000 in 1 s
    assert 50 <= allowed <= 50 + 20 + 1
    assert limiter.allow("someone-else", now=1.0)  # per requester
    assert limiter.allow("script", now=10.0)  # refilled
    many = RateLimiter(rate_per_s=1.0, burst=1, max_keys=100)
    for i in range(10_000):
        many.allow(f"k{i}", now=0.0)
    assert len(many._buckets) == 100  # bounded, whatever requesters claim to be
