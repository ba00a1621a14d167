"""Live switches, the pure parts: the codec grammar, the optimizer's state mapping and its
checkpoint shape, the checkpoint a switch orders, and the divergence guard's baseline across
a switch."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_checkpoints import job_of, ready
from tests.unit.test_planning import ctl
from torchloom.errors import InvalidKnobError
from torchloom.optim import SwitchableOptimizer
from torchloom.protocol import BUILTIN_KNOBS, HistoryEvent, coerce
from torchloom.protocol.compression import Codec, parse_codec
from torchloom.weaver.policies.divergence import baseline_since


@pytest.mark.parametrize(
    ("text", "codec"),
    [
        ("none", Codec("none")),
        ("bf16", Codec("bf16")),
        ("fp16", Codec("fp16")),
        ("powersgd:4", Codec("powersgd", rank=4)),
        ("topk:0.01", Codec("topk", fraction=0.01)),
        ("topk:.5", Codec("topk", fraction=0.5)),
    ],
)
def test_codecs_parse_and_pass_the_knob(text, codec):
    assert parse_codec(text) == codec
    assert coerce(BUILTIN_KNOBS["grad_compression"], text) == text  # "none" is a value, not off


@pytest.mark.parametrize(
    "bad", ["gzip", "powersgd:0", "powersgd:65", "topk:0", "topk:1", "topk:0.0", "off", "bf32"]
)
def test_bad_codecs_are_refused_with_the_rule(bad):
    with pytest.raises(InvalidKnobError, match="grad_compression"):
        coerce(BUILTIN_KNOBS["grad_compression"], bad)
    with pytest.raises(ValueError):
        parse_codec(bad)


def test_bytes_per_element_follow_the_codec():
    assert parse_codec("none").bytes_per_element() == 4.0
    assert parse_codec("bf16").bytes_per_element() == 2.0
    assert parse_codec("topk:0.01").bytes_per_element() == pytest.approx(0.08)
    assert parse_codec("powersgd:2").bytes_per_element(64, 512) == pytest.approx(
        4 * 2 * 576 / 32768
    )
    assert parse_codec("powersgd:2").bytes_per_element(1, 10) == 4.0  # a vector goes whole


def model_and_grads(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return m, x, y


def train(m, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()


def test_sgd_momentum_becomes_the_first_moment_and_back():
    m, x, y = model_and_grads()
    opt = SwitchableOptimizer(m, kind="sgd", lr=0.1, momentum=0.9)
    train(m, opt, x, y, 5)
    buf = {n: opt.state[p]["momentum_buffer"].clone() for n, p in m.named_parameters()}
    opt.switch("adamw")
    assert opt.kind == "adamw" and [type(o).__name__ for o in opt.inner] == ["AdamW"]
    for n, p in m.named_parameters():
        st = opt.state[p]
        assert torch.allclose(st["exp_avg"], buf[n] * 0.1)  # (1 − μ)·b
        assert torch.allclose(st["exp_avg_sq"], st["exp_avg"] ** 2)
        assert float(st["step"]) >= 10 / (1 - 0.999)  # bias correction ≈ 1
    opt.switch("sgd")
    for n, p in m.named_parameters():
        assert torch.allclose(opt.state[p]["momentum_buffer"], buf[n], rtol=1e-5, atol=1e-7)


def test_muon_takes_the_matrices_and_adamw_the_rest():
    m, x, y = model_and_grads()
    opt = SwitchableOptimizer(m, kind="adamw", lr=0.01)
    train(m, opt, x, y, 3)
    opt.switch("muon")
    muon, adamw = opt.inner
    assert type(muon).__name__ == "Muon" and type(adamw).__name__ == "AdamW"
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert all(p.ndim != 2 for g in adamw.param_groups for p in g["params"])
    before = [p.detach().clone() for p in m.parameters()]
    train(m, opt, x, y, 2)
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters(), strict=True))


def test_knobs_reach_every_param_group_after_a_switch():
    m, _, _ = model_and_grads()
    opt = SwitchableOptimizer(m, kind="lion", lr=1e-4, momentum=0.9, beta2=0.99)
    opt.set_hyper(lr=3e-4, beta2=0.98, weight_decay=0.01)
    assert all(g["betas"] == (0.9, 0.98) and g["lr"] == 3e-4 for g in opt.param_groups)
    opt.switch("sgd")
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.01 for g in opt.param_groups)


def test_step_hooks_run_around_every_step_whatever_the_kind_and_can_be_removed():
    m, x, y = model_and_grads()
    opt = SwitchableOptimizer(m, kind="sgd", lr=0.01)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o.kind)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.kind)))
    train(m, opt, x, y, 1)
    opt.switch("lion")  # torchft's LocalSGD/DiLoCo register once and count every inner step
    train(m, opt, x, y, 1)
    pre.remove()
    train(m, opt, x, y, 1)
    assert seen == [
        ("pre", "sgd"),
        ("post", "sgd"),
        ("pre", "lion"),
        ("post", "lion"),
        ("post", "lion"),
    ]


def test_the_checkpoint_shape_does_not_depend_on_the_kind_and_loads_exactly():
    m, x, y = model_and_grads()
    opt = SwitchableOptimizer(m, kind="adamw", lr=0.01)
    train(m, opt, x, y, 4)
    sd = opt.state_dict()
    fresh = SwitchableOptimizer(m, kind="sgd")
    shape = fresh.state_dict()  # what DCP loads into: the same keys and shapes, any kind
    assert shape["params"].keys() == sd["params"].keys()
    for name, entry in sd["params"].items():
        assert {k: v.shape for k, v in entry.items()} == {
            k: v.shape for k, v in shape["params"][name].items()
        }
    fresh.load_state_dict(sd)
    assert fresh.kind == "adamw"
    for p in m.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    with pytest.raises(ValueError, match="not one of"):
        fresh.switch("adam")


def test_an_optimizer_switch_orders_a_checkpoint_of_the_state_before_it():
    s = job_of(["0"], ranks=2)
    out, _ = ctl(s, 101.0, "set", {"optimizer": "adamw", "lr": 0.001})
    assert out.reply.ok and out.reply.data is None  # no Checkpointer: the switch goes alone
    ready(s, ("0", 0), ("0", 1))
    out, events = ctl(s, 102.0, "set", {"optimizer": "lion", "lr": 0.0001})
    assert out.reply.ok and out.reply.data == {"checkpoint": f"ckpt-v{out.reply.version}"}
    snap = s.job("j").config.latest()
    assert snap.checkpoint is not None and snap.values["optimizer"] == "lion"
    rec = s.job("j").checkpoints[snap.checkpoint.id]
    assert rec.values["optimizer"] == "adamw" and rec.values["lr"] == 0.001  # before the switch
    assert [e.kind for e in events] == ["config_set", "checkpoint_requested"]
    out, _ = ctl(s, 103.0, "set", {"optimizer": "lion", "lr": 0.0002})  # no switch: no checkpoint
    assert out.reply.ok and out.reply.data is None


def ev(kind, step, values=None, op="set"):
    return HistoryEvent(
        job_id="j",
        kind=kind,
        ts=0.0,
        step=step,
        message="",
        data={"op": op, "values": values or {}},
    )


def test_the_divergence_baseline_reaches_back_across_switches_only():
    from torchloom.protocol import DesiredConfig

    def since(*journal, in_force):
        return baseline_since(DesiredConfig(job_id="j", journal=list(journal)), in_force)

    start = ev("job_started", None)
    assert since(start, ev("config_set", 50, {"lr": 0.1}), in_force=50) == 50
    switch = ev("config_set", 80, {"optimizer": "adamw", "lr": 0.001})
    assert since(start, ev("config_set", 50, {"lr": 0.1}), switch, in_force=80) == 50
    assert since(start, switch, in_force=80) == 0
    codec = ev("config_set", 90, {"grad_compression": "bf16"})
    assert since(start, ev("config_set", 50, {"batch_size": 8}), switch, codec, in_force=90) == 50
    mixed = ev("config_set", 80, {"optimizer": "adamw", "batch_size": 8})  # not only a switch
    assert since(start, mixed, in_force=80) == 80
    pending = ev("config_set", 120, {"lr": 0.5})
    assert since(start, switch, pending, in_force=80) == 0
