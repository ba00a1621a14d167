"""sync_every on torchft's own LocalSGD and (Streaming) DiLoCo objects; the Manager is a stand-in."""

import time
from unittest.mock import MagicMock

import pytest
import torch

import torchloom
from torchloom.errors import InvalidKnobError
from torchloom.protocol import coerce

local_sgd = pytest.importorskip("torchft.local_sgd")
from torchloom.integrations.torchft import (  # noqa: E402
    follow_sync_every,
    set_sync_every,
    sync_every_knob,
)


def manager():
    m = MagicMock()
    m._use_async_quorum = False
    m.current_step.return_value = 0
    return m


def diloco(fragments=2, sync_every=8):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    parts = list(model) if fragments == 2 else [model]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    outer = torch.optim.SGD(model.parameters(), lr=0.7)
    return local_sgd.DiLoCo(
        manager(), parts, inner, outer, sync_every=sync_every, pin_memory=False
    ), inner


def test_diloco_knob_is_narrowed_to_what_the_fragments_allow():
    algo, _ = diloco(fragments=2)
    spec = sync_every_knob(algo)
    assert coerce(spec, 6) == 6
    with pytest.raises(InvalidKnobError, match="multiple of 2"):
        coerce(spec, 7)
    with pytest.raises(InvalidKnobError, match=">= 2"):
        coerce(spec, 0)
    set_sync_every(algo, 6)
    assert algo._sync_every == 3  # per fragment, as DiLoCo's constructor computes it
    assert [f._fragment_sync_offset for f in algo._fragments] == [3, 6]
    with pytest.raises(ValueError):
        set_sync_every(algo, 7)


def test_change_is_refused_in_the_middle_of_an_outer_step():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = local_sgd.LocalSGD(manager(), model, opt, sync_every=4)
    run = torchloom.init(job_id="j", connect=False, rank=0, replica_id="0", knobs={"sync_every": 4})
    follow_sync_every(run, algo)
    at = [10]
    steps = run.steps(current_step=lambda: at[0])
    run.shared.offer(config(version=2, effective_step=10, sync_every=6), time.time())
    assert next(steps) == 10 and algo._sync_every == 6  # applied at the step boundary
    with algo:
        model(torch.ones(1, 3)).sum().backward()
        opt.step()  # one inner step in
    run.shared.offer(config(version=3, effective_step=11, sync_every=2), time.time())
    at[0] = 11
    with pytest.raises(RuntimeError, match="once per outer step"):
        next(steps)


def config(*, version, effective_step, sync_every):
    from torchloom.protocol import ConfigSnapshot, DesiredConfig

    snaps = [
        ConfigSnapshot(version=1, effective_step=0, values={"sync_every": 4}),
        ConfigSnapshot(
            version=version, effective_step=effective_step, values={"sync_every": sync_every}
        ),
    ]
    return DesiredConfig(job_id="j", snapshots=snaps)


def test_heal_source_names_the_peer_in_torchloom_terms():
    from types import SimpleNamespace

    from torchloom.integrations.torchft import heal_source

    q = SimpleNamespace(recover_src_replica_rank=1, replica_ids=["ft_2:aa", "ft_0:bb"])
    assert heal_source(q, job_id="ft") == "0"
    assert heal_source(q, job_id="other") == "ft_0"  # not our naming: torchft's own id
    assert heal_source(SimpleNamespace(recover_src_replica_rank=None), job_id="ft") is None
    assert heal_source(None, job_id="ft") is None
