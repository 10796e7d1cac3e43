"""Adding a method is one module and one registry line: here a fourth method lives in this test file alone."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import stepcache
from stepcache import methods
from stepcache.methods.base import STACK, Method
from stepcache.policies import Decision
from stepcache.profiles import Profile, load_profile
from stepcache.schema import finite

import wan_tiny as W
from helpers import BlockWork

ROOT = Path(__file__).resolve().parents[1]


class EveryOtherPolicy:
    """Reuse every other step after the first ``thresh`` steps: a fixed pattern, no measurement."""

    def __init__(self, start: float):
        self.start = start

    def restart_accumulation(self) -> None:
        pass

    def decide(self, step, num_steps, measurement, have_cache):
        if step >= self.start and step % 2 == 1 and have_cache and step < num_steps - 1:
            return Decision(False, "reuse", None)
        return Decision(True, "pattern", None)


class EveryOther(Method):
    name = "everyother"
    skips = STACK
    PARAMETERS = {"thresh": ("first step that may be reused", finite(0)),
                  "predict": ("as the other methods", (lambda v: v in ("reuse", "linear"), "is not reuse or linear"))}

    def make_policy(self, config, branch, num_steps):
        return EveryOtherPolicy(config.params["thresh"])


@pytest.fixture
def everyother():
    methods.register(EveryOther())
    yield
    methods.unregister("everyother")


def test_a_method_defined_in_a_test_runs_on_a_real_pipeline(everyother):
    data = dict(load_profile("wan2.1-t2v-1.3b").data)
    data["everyother"] = {"defaults": {"thresh": 2}}
    profile = Profile("with-everyother", data)
    pipe, plain = W.build_t2v(), W.build_t2v()
    work = BlockWork(pipe.transformer)
    stepcache.enable(pipe, "everyother", profile=profile)
    out = W.run_t2v(pipe, steps=8)
    stats = stepcache.stats(pipe)
    assert stats.pattern(branch="cond") == "CCC.C.CC"
    assert stats.pattern(branch="uncond") == "CCC.C.CC"
    assert work.calls == work.per_pass * 12  # no block ran on the 4 reused passes
    stepcache.disable(pipe)
    assert not torch.equal(out, W.run_t2v(plain, steps=8))
    with pytest.raises(stepcache.errors.ProfileError, match=r"everyother.defaults.thresh=-1 is outside"):
        Profile("bad", {**data, "everyother": {"defaults": {"thresh": -1}}})


def test_the_runner_and_the_front_door_name_no_method():
    for path in ("common/runner.py", "common/api.py"):
        text = (ROOT / path).read_text()
        found = re.findall(r"teacache|magcache|easycache", text, flags=re.I)
        assert not found, f"{path} names a method: {sorted(set(found))}"


def test_the_core_imports_no_family():
    """Dependencies point one way: the families import the core, never the reverse (stepcache.families finds
    them through entry points)."""
    import ast
    for path in sorted((ROOT / "common").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.lstrip(".").split(".")
                assert not ({"wan21", "hunyuan", "opensora"} & set(parts[:2])), f"{path.name} imports {name}"
        text = path.read_text()
        for family_module in ("stepcache.wan21", "stepcache.hunyuan", "stepcache.opensora"):
            assert family_module not in text, f"{path.name} names {family_module}"


def test_a_family_registers_its_pipelines_adapters_targets_and_commands():
    from stepcache import families
    names = {f.name for f in families.families()}
    assert names == {"wan2.1", "wan2.2", "hunyuanvideo", "hunyuanvideo1.5", "opensora"}
    assert families.pipelines()["WanImageToVideoPipeline"][1].needs_image
    assert families.pipelines()["HunyuanVideoPipeline"][1].call_kwargs(None, 2.0) == {"guidance_scale": 6.0,
                                                                                     "true_cfg_scale": 2.0}
    assert families.calibration_target("demo") is not None and families.calibration_target("nope") is None
    assert "demo" in [name for name, _, _ in families.commands()]


def test_the_front_door_does_not_import_calibration():
    """Calibration builds on the front door (it installs a measuring runner like a cache); the reverse import
    made a cycle. The profile-fit check the front door needs lives with the profiles."""
    import ast
    tree = ast.parse((ROOT / "common/api.py").read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1]
    assert "calibrate" not in names
