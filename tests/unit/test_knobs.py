import math

import pytest

from torchloom.errors import InvalidKnobError
from torchloom.protocol import BUILTIN_KNOBS, KnobSpec, coerce, coerce_all
from torchloom.protocol.knobs import check_spec


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("lr", "0.01", 0.01),
        ("lr", 1, 1.0),
        ("batch_size", "128", 128),
        ("batch_size", 64.0, 64),
        ("batch_size", "1e3", 1000),
        ("grad_clip", "off", None),
        ("grad_clip", None, None),
        ("grad_clip", "0", 0.0),
        ("max_steps", "5000", 5000),
        ("sync_every", 8, 8),
    ],
)
def test_valid_values_are_coerced(name, raw, expected):
    value = coerce(BUILTIN_KNOBS[name], raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "raw", "fragment"),
    [
        ("lr", "0", "must be > 0"),
        ("lr", -1, "must be > 0"),
        ("lr", "nan", "not a finite number"),
        ("lr", "inf", "not a finite number"),
        ("lr", "fast", "not a valid float"),
        ("lr", True, "not a valid float"),
        ("lr", "off", "cannot be switched off"),
        ("batch_size", 0, "must be >= 1"),
        ("batch_size", "2.5", "not an integer"),
        ("batch_size", [1], "not a valid int"),
        ("grad_clip", -0.5, "must be >= 0"),
        ("sync_every", 0, "must be >= 1"),
        ("max_steps", "0", "must be >= 1"),
    ],
)
def test_invalid_values_name_the_knob_and_rule(name, raw, fragment):
    with pytest.raises(InvalidKnobError) as info:
        coerce(BUILTIN_KNOBS[name], raw)
    assert info.value.knob == name
    assert fragment in str(info.value)


def test_coerce_all_is_all_or_nothing_and_names_unknown_knobs():
    with pytest.raises(InvalidKnobError) as info:
        coerce_all(BUILTIN_KNOBS, {"lr": "0.1", "warp_speed": "9"})
    assert info.value.knob == "warp_speed" and "unknown knob" in info.value.rule
    assert coerce_all(BUILTIN_KNOBS, {"lr": "0.1", "batch_size": "32"}) == {
        "lr": 0.1,
        "batch_size": 32,
    }


def test_custom_knobs_bool_str_and_bounds():
    dropout = KnobSpec(name="dropout", type="float", min=0.0, max=1.0)
    aug = KnobSpec(name="augment", type="bool")
    mode = KnobSpec(name="mode", type="str", choices=("fast", "exact"))
    assert coerce(dropout, "0.5") == 0.5
    assert coerce(aug, "on") is True and coerce(aug, "false") is False
    assert coerce(mode, "exact") == "exact"
    with pytest.raises(InvalidKnobError):
        coerce(dropout, 1.5)
    with pytest.raises(InvalidKnobError):
        coerce(aug, "maybe")
    with pytest.raises(InvalidKnobError):
        coerce(mode, "slow")


def test_off_words_that_are_values_of_the_knob_keep_their_meaning():
    # the dashboard sends every knob as typed: `lr_scaling=none` is a choice, `augment=off` is False
    assert coerce(BUILTIN_KNOBS["lr_scaling"], "none") == "none"
    switch = KnobSpec(name="augment", type="bool")
    assert coerce(switch, "off") is False and coerce(switch, "OFF") is False
    with pytest.raises(InvalidKnobError, match="cannot be switched off"):
        coerce(switch, "none")
    assert coerce(KnobSpec(name="flag", type="bool", allow_off=True), "null") is None
    assert coerce(BUILTIN_KNOBS["grad_clip"], "none") is None


def test_check_spec_refuses_bad_definitions():
    with pytest.raises(InvalidKnobError):
        check_spec(KnobSpec(name="bad name", type="int"))
    with pytest.raises(InvalidKnobError):
        check_spec(KnobSpec(name="x", type="int", min=5, max=1))
    with pytest.raises(InvalidKnobError):
        check_spec(KnobSpec(name="lr", type="int"))
    assert check_spec(KnobSpec(name="lr", type="float", max=0.5)).max == 0.5
    with pytest.raises(InvalidKnobError, match="job-wide"):
        check_spec(KnobSpec(name="sync_every", type="int", scope="replica"))
    with pytest.raises(InvalidKnobError, match="multiple_of"):
        check_spec(KnobSpec(name="x", type="float", multiple_of=2))
    with pytest.raises(InvalidKnobError, match="multiple_of"):
        check_spec(KnobSpec(name="x", type="int", multiple_of=0))


def test_multiple_of_narrows_an_int_knob():
    spec = check_spec(KnobSpec(name="sync_every", type="int", min=2, multiple_of=2, scope="job"))
    assert spec.rule() == "int >= 2, a multiple of 2"
    assert coerce(spec, "8") == 8
    with pytest.raises(InvalidKnobError, match="7 is not a multiple of 2"):
        coerce(spec, "7")
    with pytest.raises(InvalidKnobError, match="must be >= 2"):
        coerce(spec, 0)


def test_rules_read_well():
    assert BUILTIN_KNOBS["lr"].rule() == "float > 0 and <= 1000"
    assert BUILTIN_KNOBS["grad_clip"].rule() == "float >= 0 or off"
    assert not math.isnan(coerce(BUILTIN_KNOBS["lr"], "1e-4"))
