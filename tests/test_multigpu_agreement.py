"""Every rank takes the same decision by construction: one agreement per pass under a parallel group."""
from __future__ import annotations

import pytest
import torch

from multigpu_launch import torchrun


def test_ranks_with_different_inputs_still_decide_alike(tmp_path):
    """EasyCache on latents that differ between ranks (unseeded ranks under diffusers' context parallelism):
    alone, the ranks' patterns differ (on GPUs one rank would skip while the other waits in all-to-all); with the
    agreement, both compute whenever either does."""
    ranks, seconds = torchrun("multigpu_agreement_worker.py", [{}], tmp_path, timeout=120)
    r0, r1 = ranks
    assert r0["alone"] != r1["alone"], "the inputs must make the ranks disagree for the test to mean anything"
    assert r0["agreed"] == r1["agreed"]
    assert "." in r0["agreed"]
    print(f"\n[agreement] patterns alone {r0['alone']} / {r1['alone']}, agreed {r0['agreed']}; "
          f"{r0['seconds_per_agreement'] * 1e6:.0f} us per agreement (gloo, CPU)")


def test_the_decision_packet_is_built_on_the_activation_device(monkeypatch):
    """share_decision must not guess the device from the backend's name: a CUDA backend registered under another
    name got a CPU tensor. The packet lives where the activation lives."""
    import torch.distributed as dist

    from stepcache import distributed
    from stepcache.policies import Decision
    seen = []

    class Collected(Exception):
        pass

    def all_reduce(t, op=None, group=None):
        seen.append(t.device)
        raise Collected

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "some-cuda-backend", raising=False)
    group = distributed.SequenceGroup(None, "test")
    with pytest.raises(Collected):
        distributed.share_decision(group, Decision(True, "threshold", 0.1), torch.device("meta"))
    assert seen == [torch.device("meta")]
