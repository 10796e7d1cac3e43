"""predict="linear": a reused pass extrapolates the last two computed residuals instead of repeating the last one.

The runner is driven directly with known tensors, so the expected outputs are computed by hand from them; the
pipeline tests check the invariants every option must keep (threshold 0 bit-identical, no block work on a
reused pass, published behaviour by default)."""
import pytest
import torch

import stepcache
from stepcache.methods import resolve_method
from stepcache.policies import ParameterError
from stepcache.profiles import load_profile
from stepcache.runner import CacheRunner, NothingCachedWarning
from helpers import BlockWork
from wan_tiny import build_t2v, run_t2v

PROFILE = "wan2.1-t2v-1.3b"


def flat_magcache_profile():
    """Every ratio 1.0 (the bench's fixed-skip table): the accumulated error stays 0, so only K ends a run."""
    from stepcache.eval.bench_peers import flat_ratio_profile
    return flat_ratio_profile(load_profile(PROFILE))


def tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, generator=g) for _ in range(n)]


def drive_stack_runner(runner, h0s, outs, steps):
    """One branch through ``steps`` passes; returns what the stack produced (computed or predicted) per step."""
    produced = []
    for step in range(steps):
        runner.begin_pass("cond", step, steps, h0s[step])
        reused = runner.enter_stack(h0s[step])
        if reused is None:
            runner.leave_stack(outs[step])
            produced.append(outs[step])
        else:
            produced.append(reused)
        runner.end_pass(None)
    return produced


@pytest.mark.parametrize("predict", ["reuse", "linear"])
def test_block_stack_prediction_by_hand(predict):
    steps = 6
    config = resolve_method("magcache", flat_magcache_profile(), thresh=0.5, K=1,
                            retention_ratio=0.0, predict=predict)
    runner = CacheRunner(config)
    h0s, outs = tensors(steps, 1), tensors(steps, 2)
    produced = drive_stack_runner(runner, h0s, outs, steps)
    assert runner.stats.pattern() == "C.C.C."
    r = {s: outs[s] - h0s[s] for s in (0, 2, 4)}
    # step 1 has one computed residual only: both modes repeat it
    torch.testing.assert_close(produced[1], h0s[1] + r[0], rtol=0, atol=1e-6)
    for step, (older, last) in ((3, (0, 2)), (5, (2, 4))):
        if predict == "reuse":
            expected = h0s[step] + r[last]
        else:  # the line through (older, r_older) and (last, r_last), read at this step
            expected = h0s[step] + r[last] + (r[last] - r[older]) * (step - last) / (last - older)
        torch.testing.assert_close(produced[step], expected, rtol=0, atol=1e-6)


def test_linear_prediction_reaches_further_on_longer_runs():
    """With K=2 the second reuse of a run is two steps from the last computed one: the slope counts twice."""
    steps = 7
    config = resolve_method("magcache", flat_magcache_profile(), thresh=0.5, K=2,
                            retention_ratio=0.0, predict="linear")
    runner = CacheRunner(config)
    h0s, outs = tensors(steps, 3), tensors(steps, 4)
    produced = drive_stack_runner(runner, h0s, outs, steps)
    assert runner.stats.pattern() == "C..C..C"
    r0, r3 = outs[0] - h0s[0], outs[3] - h0s[3]
    for step in (4, 5):
        torch.testing.assert_close(produced[step], h0s[step] + r3 + (r3 - r0) * (step - 3) / 3, rtol=0, atol=1e-6)


def test_easycache_linear_prediction_of_the_output():
    """EasyCache reuses the model output minus input: extrapolated the same way, added to the new input."""
    steps = 5
    config = resolve_method("easycache", PROFILE, thresh=100.0, warmup_steps=2, force_last=True,
                            predict="linear")
    runner = CacheRunner(config)
    xs, vs = tensors(steps, 5), tensors(steps, 6)
    produced = []
    for step in range(steps):
        ctx = runner.begin_pass("cond", step, steps, xs[step])
        if ctx.reused_output is None:
            assert runner.enter_stack(xs[step]) is None
            runner.end_pass(vs[step])
            produced.append(vs[step])
        else:
            produced.append(ctx.reused_output)
            runner.end_pass(None)
    assert runner.stats.pattern() == "CC..C"
    d0, d1 = vs[0] - xs[0], vs[1] - xs[1]
    for step in (2, 3):
        torch.testing.assert_close(produced[step], xs[step] + d1 + (d1 - d0) * (step - 1), rtol=0, atol=1e-6)


def test_linear_prediction_is_not_the_default_and_bad_values_are_named():
    assert resolve_method("magcache", PROFILE).params["predict"] == "reuse"
    with pytest.raises(ParameterError, match=r"predict='quadratic' is not one of reuse, linear"):
        resolve_method("teacache", PROFILE, predict="quadratic")


@pytest.mark.parametrize("method,params", [("magcache", dict(thresh=0.24, K=2)),
                                           ("easycache", dict(thresh=0.3, warmup_steps=2))])
def test_linear_prediction_on_a_pipeline_keeps_the_invariants(method, params):
    baseline = run_t2v(build_t2v())

    pipe = build_t2v()
    stepcache.enable(pipe, method, profile=PROFILE, **{**params, "thresh": 0.0}, predict="linear")
    with pytest.warns(NothingCachedWarning):
        assert torch.equal(run_t2v(pipe), baseline)

    outputs = {}
    for predict in ("reuse", "linear"):
        pipe = build_t2v()
        work = BlockWork(pipe.transformer)
        stepcache.enable(pipe, method, profile=PROFILE, **params, predict=predict)
        outputs[predict] = run_t2v(pipe)
        records = stepcache.stats(pipe).of()
        assert sum(not r.computed for r in records) >= 2, "precondition: the setting reuses passes"
        assert len(work.block) == len(records)
        for record, linear_calls in zip(records, work.block):
            assert linear_calls == (work.per_pass if record.computed else 0), record
    assert not torch.equal(outputs["reuse"], outputs["linear"])


def test_generate_cli_takes_predict(tmp_path):
    from stepcache import generate
    from wan_tiny import save_t2v_folder
    folder = save_t2v_folder(tmp_path / "tiny-wan")
    parser = __import__("argparse").ArgumentParser()
    generate.add_arguments(parser)
    common = ["--model", str(folder), "--prompt", "x", "--height", "32", "--width", "32",
              "--profile", PROFILE]
    for method in ("teacache", "magcache", "easycache"):
        planned = generate.plan(parser.parse_args([*common, "--method", method, "--predict", "linear"]))
        assert planned["config"].params["predict"] == "linear"
    assert generate.plan(parser.parse_args([*common, "--method", "magcache"]))["config"].params["predict"] == "reuse"
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--predict", "cubic"])
