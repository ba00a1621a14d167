"""Typed errors end to end: a refusal carries its error's code, and the client raises the
same class again (code → class), with the message and the knob."""

import pytest

from torchloom.errors import (
    ERRORS_BY_CODE,
    InvalidKnobError,
    TorchloomError,
    UnknownJobError,
    from_wire,
)
from torchloom.protocol import ControlReply


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_every_error_class_comes_back_from_its_code(code):
    exc = from_wire(code, "it went wrong", knob=None)
    assert type(exc) is ERRORS_BY_CODE[code] and exc.remote and exc.message == "it went wrong"


def test_a_refusal_round_trips_to_the_same_class_message_and_knob():
    reply = ControlReply.refusal(InvalidKnobError("lr", "-1.0 must be > 0"), prefix="no: ")
    assert not reply.ok and reply.error.code == "invalid_knob" and reply.error.knob == "lr"
    exc = from_wire(reply.error.code, reply.error.message, knob=reply.error.knob)
    assert isinstance(exc, InvalidKnobError) and exc.knob == "lr"
    assert exc.message == "no: knob 'lr': -1.0 must be > 0"
    with pytest.raises(UnknownJobError):
        raise from_wire("unknown_job", "unknown job 'x'")


def test_an_unknown_code_is_a_plain_torchloom_error():
    exc = from_wire("from_the_future", "?")
    assert type(exc) is TorchloomError and exc.remote


def test_every_error_class_lives_in_errors_and_has_its_own_code():
    codes = [cls.code for cls in ERRORS_BY_CODE.values()]
    assert len(codes) == len(set(codes))
    assert all(cls.__module__ == "torchloom.errors" for cls in ERRORS_BY_CODE.values())
