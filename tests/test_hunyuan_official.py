"""The official-repo drop-in scripts, checked against a real Tencent/HunyuanVideo checkout (HUNYUANVIDEO_REPO).

A tiny HYVideoDiffusionTransformer (weights perturbed: upstream zero-initialises its modulation and final
layers) runs through upstream's own HunyuanVideoSampler and pipeline with stub text encoders and VAE, and
upstream's CUDA-only varlen flash attention replaced by an SDPA equivalent (upstream-cpu.md §1). Checked
against upstream fa14b001c18f37191c938a9ef6baad3b9b472759.
"""
from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hunyuan_tiny as T
from helpers import BlockWork, hunyuanvideo_checkout
from stepcache.hunyuan.resolution import ResolutionWarning, choose_by_resolution
from stepcache.profiles import load_profile
from stepcache.runner import NothingCachedWarning

HUNYUAN_DIR = Path(__file__).resolve().parents[1] / "hunyuan"
SCRIPTS = {"magcache": "magcache_sample_video.py", "teacache": "teacache_sample_video.py",
           "easycache": "easycache_sample_video.py"}
THRESH_FLAG = {"magcache": "--magcache-thresh", "teacache": "--teacache-thresh", "easycache": "--easycache-thresh"}
PUBLISHED_720P_E024K6 = "CCCCCCCCCC....C...C....C.....C....C......C....C.CC"
PUBLISHED_544P_E024K6 = "CCCCCCCCCC....C...C....C.....C....C......C....C.C."

CAT = '"A cat walks on the grass, realistic style."'
COUPLE = ('"A couple in formal evening attire is caught in heavy rain on their way home, holding a black umbrella. '
          'In the flat shot, the man is wearing a black suit and the woman is wearing a white long dress. They walk '
          'slowly in the rain, and the rain drips down the umbrella. The camera moves smoothly with their steps, '
          'showing their elegant posture in the rain."')
ASTRONAUTS = ('"The video shows two astronauts in bulky suits walking slowly on the moon\u2019s surface, against a '
              'vast starry universe. Their steps are heavy and slow, kicking up dust in the low-gravity environment. '
              'The scene is silent, mysterious, and evokes the courage and dreams of space exploration."')
FP8 = (f"--dit-weight /weights/hunyuan_fp8.pt --video-size 1280 720 --video-length 129 --infer-steps 50 "
       f"--prompt {CAT} --seed 42 --embedded-cfg-scale 6.0 --flow-shift 7.0 --flow-reverse --use-cpu-offload "
       f"--use-fp8 --save-path ./teacache_fp8_results")
MULTI_GPU = (f"--video-size 1280 720 --video-length 129 --infer-steps 50 --prompt {CAT} --flow-reverse --seed 42 "
             f"--ulysses-degree 8 --ring-degree 1 --save-path ./teacache_results")
# (script, the flags of a published command verbatim, expected profile, expect a resolution warning)
PUBLISHED_COMMANDS = [
    ("teacache", f"--video-size 720 1280 --video-length 129 --infer-steps 50 --prompt {CAT} --flow-reverse "
                 f"--use-cpu-offload --save-path ./teacache_results", "hunyuanvideo-t2v-720p", False),
    ("teacache", MULTI_GPU, "hunyuanvideo-t2v-720p", False),
    ("teacache", FP8, "hunyuanvideo-t2v-720p", False),
    ("magcache", f"--video-size 544 960 --video-length 129 --infer-steps 50 --seed 0 --prompt {COUPLE} "
                 f"--flow-reverse --use-cpu-offload --save-path ./magcache_results", "hunyuanvideo-t2v-544p", False),
    ("magcache", f"--video-size 720 1280 --video-length 129 --infer-steps 50 --seed 0 --prompt {ASTRONAUTS} "
                 f"--flow-reverse --use-cpu-offload --save-path ./magcache_results", "hunyuanvideo-t2v-720p", False),
    ("magcache", MULTI_GPU, "hunyuanvideo-t2v-720p", False),  # 1280x720 is portrait 720p: its own table
    ("magcache", FP8, "hunyuanvideo-t2v-720p", False),
    ("easycache", '--video-size 544 960 --video-length 129 --infer-steps 50 --prompt "Your own prompt" '
                  '--flow-reverse --use-cpu-offload --save-path ./results --seed 42', "hunyuanvideo-t2v-544p", False),
]


# --------------------------------------------------------------------------------- without an upstream checkout
@pytest.mark.parametrize("method", SCRIPTS)
def test_seed_scripts_are_thin_entry_points(method):
    """Each script is a few lines naming its method; the implementation is shared and importable from an
    installed stepcache (the file is copied into someone else's checkout)."""
    source = (HUNYUAN_DIR / SCRIPTS[method]).read_text()
    tree = ast.parse(source)
    code_lines = [line for line in source.splitlines()[len(ast.get_docstring(tree).splitlines()) + 2:] if line]
    assert len(code_lines) <= 10
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(i.module, [a.name for a in i.names]) for i in imports] == [("stepcache.hunyuan.official", ["run_script"])]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_script"]
    assert [c.args[0].value for c in calls] == [method]


@pytest.mark.parametrize("size,profile,warns", [
    ((720, 1280), "hunyuanvideo-t2v-720p", False),
    ((544, 960), "hunyuanvideo-t2v-544p", False),
    ((720, 960), "hunyuanvideo-t2v-720p", False),  # the reference chooses by height
    ((1280, 720), "hunyuanvideo-t2v-720p", False),  # portrait 720p; its own README's 8-GPU command crashes the reference
    ((480, 848), "hunyuanvideo-t2v-544p", True),
    ((64, 64), "hunyuanvideo-t2v-544p", True),
])
def test_table_choice_by_resolution(size, profile, warns):
    candidates = [load_profile("hunyuanvideo-t2v-720p"), load_profile("hunyuanvideo-t2v-544p")]
    chosen, warning = choose_by_resolution(candidates, *size)
    assert chosen.name == profile
    assert (warning is not None) == warns
    if warns:
        assert f"calibrated at {size[0]}x{size[1]}" in warning and profile in warning


# ------------------------------------------------------------------------------------ with an upstream checkout
@pytest.fixture(scope="module")
def upstream():
    root = hunyuanvideo_checkout()
    with T.upstream_on_cpu(root):
        from stepcache.hunyuan import official
        yield types.SimpleNamespace(root=root, official=official)


@pytest.fixture
def model(upstream):
    import stepcache
    m = T.build_upstream_model()
    yield m
    stepcache.disable(m)


def write_sample(sample, path):
    """Stands in for upstream's save_videos_grid: writes the sample's bytes to the file it is given."""
    Path(path).write_bytes(sample.numpy().tobytes())


def _videos(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.mp4")} if folder.is_dir() else {}


def _main(upstream, method, argv, model, tmp_path, sampler=None, **kw):
    """Run a seed script's main() in-process on the tiny model; returns (stats or None, the videos it saved)."""
    import stepcache
    sampler_of = sampler or (lambda args: T.build_sampler(args, model))
    before = _videos(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingCachedWarning)
        rc = upstream.official.main(method, [*argv, "--save-path", str(tmp_path)], load=sampler_of,
                                    save=write_sample, **kw)
    assert rc == 0
    saved = sorted(str(p) for p, stamp in _videos(tmp_path).items() if before.get(p) != stamp)
    cached = getattr(model, "_stepcache", None)
    return (stepcache.stats(model) if cached else None), saved


def exit_status(call) -> int:
    """A main()'s exit status, whether it returned it or argparse exited with it."""
    try:
        return call()
    except SystemExit as exc:
        return exc.code


def _upstream_parser_options(upstream) -> set[str]:
    """Every option string of upstream's own parse_args(), captured from the parser it builds."""
    import argparse
    from hyvideo import config
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            config.parse_args()
    finally:
        argparse.ArgumentParser.parse_args = original
    return {o for a in captured["parser"]._actions for o in a.option_strings}


@pytest.mark.parametrize("method,flags,profile,warns", PUBLISHED_COMMANDS)
def test_published_commands_parse(upstream, method, flags, profile, warns):
    args, plan = upstream.official.parse_args(method, shlex.split(flags))
    assert plan.method == method and plan.profile.name == profile
    assert (plan.warning is not None) == warns
    assert args.infer_steps == 50 and args.video_length == 129 and args.flow_reverse
    assert plan.config.describe().startswith(method)
    if "--use-fp8" in flags:
        assert args.use_fp8 and args.dit_weight == "/weights/hunyuan_fp8.pt" and args.embedded_cfg_scale == 6.0
    if "--ulysses-degree" in flags:
        assert args.ulysses_degree == 8 and bool(plan.notes) == (method == "teacache")
    defaults = {"magcache": {"thresh": 0.24, "K": 6, "retention_ratio": 0.2}, "teacache": {"thresh": 0.15},
                "easycache": {"thresh": 0.025, "warmup_steps": 5}}[method]
    assert {k: plan.config.params[k] for k in defaults} == defaults


@pytest.mark.parametrize("method", ["magcache", "teacache", "easycache"])
def test_cache_predict_reaches_every_method(upstream, method):
    _, plan = upstream.official.parse_args(method, T.tiny_argv("--cache-predict", "linear"))
    assert plan.config.params["predict"] == "linear"
    _, plan = upstream.official.parse_args(method, T.tiny_argv())
    assert plan.config.params["predict"] == "reuse"


def test_cache_storage_flags_reach_the_run(upstream, model, tmp_path):
    """--cache-dtype/--cache-device: planned, refused where there is no cache, and applied: a bf16 cache of the
    float32 tiny model holds half the bytes of the float32 one, with the same decisions."""
    _, plan = upstream.official.parse_args("magcache", T.tiny_argv("--cache-dtype", "bf16", "--cache-device", "cpu"))
    assert (plan.storage.dtype, plan.storage.device) == (torch.bfloat16, torch.device("cpu"))
    plain, _ = _main(upstream, "magcache", T.tiny_argv("--magcache-thresh", "0.5"), model, tmp_path)
    plain = plain.to_dict()
    half, _ = _main(upstream, "magcache", T.tiny_argv("--magcache-thresh", "0.5", "--cache-dtype", "bf16"), model,
                    tmp_path)
    half = half.to_dict()
    assert half["pattern"] == plain["pattern"] and "." in plain["pattern"]
    assert "residuals kept in bf16" in half["notes"]
    assert half["cache_peak_bytes"]["cond"] * 2 == plain["cache_peak_bytes"]["cond"]


def _copied_script_run(root: Path, tmp_path: Path, method: str, *argv: str) -> subprocess.Popen:
    """The script as a user runs it: a copy at the root of a checkout (here a symlink to its hyvideo/)."""
    where = tmp_path / method
    where.mkdir()
    (where / "hyvideo").symlink_to(root / "hyvideo")
    (where / SCRIPTS[method]).write_text((HUNYUAN_DIR / SCRIPTS[method]).read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, SCRIPTS[method], *argv], cwd=where, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_help_lists_upstream_flags_and_ours(upstream, tmp_path):
    upstream_options = _upstream_parser_options(upstream)
    assert {"--video-size", "--flow-reverse", "--use-cpu-offload", "--use-fp8", "--dit-weight",
            "--embedded-cfg-scale", "--ulysses-degree"} <= upstream_options
    ours = {"--cache-method", "--cache-profile", "--cache-preset", "--cache-stats", "--teacache-thresh",
            "--magcache-thresh", "--magcache-K", "--retention-ratio", "--easycache-thresh", "--magcache-calibration",
            "--cache-predict"}
    proc = _copied_script_run(upstream.root, tmp_path, "magcache", "--help")  # as a user runs it
    helps = {m: upstream.official.build_parser(m).format_help() for m in ("teacache", "easycache")}
    helps["magcache"], err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for method, text in helps.items():
        listed = {word.rstrip(",") for word in text.split() if word.startswith("--")}
        assert upstream_options - {"-h"} <= listed, upstream_options - listed
        assert ours <= listed, ours - listed
        assert f"default: {method}" in text


def test_bad_value_fails_before_loading_with_a_clear_message(upstream, tmp_path, capsys):
    proc = _copied_script_run(upstream.root, tmp_path, "magcache", "--magcache-thresh", "-1", "--model-base",
                              str(tmp_path / "missing"), "--prompt", "x")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "argument --magcache-thresh: magcache thresh=-1.0 is outside the allowed range" in err
    assert "models_root" not in err and "Traceback" not in err

    def never(args):
        raise AssertionError("a model was loaded")
    bad = [("magcache", ["--magcache-K", "0"], "--magcache-K"),
           ("magcache", ["--retention-ratio", "1.0"], "--retention-ratio"),
           ("magcache", ["--magcache-thresh", "nan"], "--magcache-thresh"),
           ("magcache", ["--teacache-thresh", "0.1"], "--teacache-thresh"),
           ("teacache", ["--teacache-thresh", "-0.1"], "--teacache-thresh"),
           ("easycache", ["--easycache-thresh", "x"], "--easycache-thresh"),
           ("magcache", ["--cache-profile", "no-such-profile"], "--cache-profile"),
           ("magcache", ["--cache-profile", "wan2.1-t2v-1.3b"], "--cache-profile"),
           ("magcache", ["--cache-preset", "E999"], "--cache-preset"),
           ("magcache", ["--infer-steps", "1"], "--infer-steps"),
           ("easycache", ["--cache-method", "none", "--easycache-thresh", "0.1"], "--easycache-thresh"),
           ("magcache", ["--cache-method", "none", "--cache-predict", "linear"], "--cache-predict"),
           ("magcache", ["--magcache-calibration", "x.json", "--cache-predict", "linear"], "--cache-predict"),
           ("teacache", ["--cache-predict", "cubic"], "--cache-predict"),
           ("magcache", ["--cache-method", "none", "--cache-dtype", "bf16"], "--cache-dtype"),
           ("magcache", ["--magcache-calibration", "x.json", "--cache-device", "cpu"], "--cache-device"),
           ("teacache", ["--cache-device", "gpu"], "--cache-device")]
    for method, argv, flag in bad:
        assert exit_status(lambda: upstream.official.main(method, T.tiny_argv(*argv), load=never)) == 2, \
            (method, argv)
        assert flag in capsys.readouterr().err, (method, argv)


@pytest.mark.parametrize("extra", [[], ["--cfg-scale", "4.0"]], ids=["distilled", "batched_cfg"])
def test_threshold_zero_is_bit_identical_to_upstream(upstream, model, tmp_path, extra):
    calls = T.Calls(model)
    try:
        _main(upstream, "magcache", T.tiny_argv("--cache-method", "none", *extra), model, tmp_path)
        baseline = list(calls.outputs)
        assert len(baseline) == 8 and not any(torch.equal(o, torch.zeros_like(o)) for o in baseline)
        for method in SCRIPTS:
            calls.outputs.clear()
            stats, _ = _main(upstream, method, T.tiny_argv(THRESH_FLAG[method], "0", *extra), model, tmp_path)
            assert stats.counts() == (8, 8)
            assert len(calls.outputs) == 8
            assert all(torch.equal(a, b) for a, b in zip(calls.outputs, baseline)), method
    finally:
        calls.remove()


def test_magcache_run_reuses_passes_and_writes_stats(upstream, model, tmp_path):
    work = BlockWork(model, T.OFFICIAL_STACKS)
    with pytest.warns(ResolutionWarning, match="calibrated at 64x64"):
        stats, videos = _main(upstream, "magcache", T.tiny_argv(steps=50), model, tmp_path)
    assert stats.pattern() == PUBLISHED_544P_E024K6  # 64x64 is nearest the 544p table by pixel area
    assert work.ran() == PUBLISHED_544P_E024K6
    assert len(videos) == 1
    record = json.loads(Path(videos[0]).with_suffix(".stats.json").read_text())
    assert (record["computed_passes"], record["total_passes"]) == (18, 50)
    assert record["profile"] == "hunyuanvideo-t2v-544p" and "calibrated at 64x64" in record["profile_warning"]

    work.block.clear()
    target = tmp_path / "stats" / "run.json"
    stats, _ = _main(upstream, "magcache", T.tiny_argv("--cache-profile", "hunyuanvideo-t2v-720p", "--cache-stats",
                                                       str(target), steps=50), model, tmp_path)
    assert stats.pattern() == PUBLISHED_720P_E024K6 and stats.counts() == (19, 50)
    assert work.ran() == PUBLISHED_720P_E024K6
    assert json.loads(target.read_text())["pattern"] == PUBLISHED_720P_E024K6
    work.remove()


def test_reused_pass_adds_the_image_token_residual(upstream, model, tmp_path):
    """From outside the cache: on a reused pass the final layer gets img_in's tokens plus the image part of the
    last computed pass's block-stack residual (the single blocks' [img; txt] sequence sliced correctly)."""
    h0, seen = {}, []
    hooks = [model.img_in.register_forward_hook(lambda m, a, out: h0.__setitem__("h", out)),
             model.final_layer.register_forward_pre_hook(lambda m, args: seen.append((h0["h"], args[0])))]
    try:
        stats, _ = _main(upstream, "magcache", T.tiny_argv("--cache-profile", "hunyuanvideo-t2v-720p", steps=50),
                         model, tmp_path)
    finally:
        for h in hooks:
            h.remove()
    residual, reused = None, 0
    for record, (h, final_in) in zip(stats.of(), seen):
        assert final_in.shape == h.shape
        if record.computed:
            residual = final_in - h
        else:
            reused += 1
            assert torch.equal(final_in, h + residual)
    assert reused == 31


def _reference_signal(block, img, vec):
    """TC-HY:82-97 written out from upstream's weights: LayerNorm without affine of the embedded image tokens,
    times 1 + scale1, plus shift1, (shift1, scale1) the first two chunks of double_blocks[0].img_mod(vec)."""
    mod = F.linear(F.silu(vec), block.img_mod.linear.weight, block.img_mod.linear.bias)
    shift, scale = mod.chunk(6, dim=-1)[:2]
    return F.layer_norm(img, img.shape[-1:], eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def test_teacache_reuses_and_reads_the_reference_signal(upstream, model, tmp_path):
    inputs = []
    hook = model.double_blocks[0].register_forward_pre_hook(lambda m, args: inputs.append((args[0], args[2])))
    work = BlockWork(model, T.OFFICIAL_STACKS, exclude=("double_blocks.0.img_mod.linear",))
    try:
        stats, _ = _main(upstream, "teacache", T.tiny_argv("--teacache-thresh", "5", steps=12), model, tmp_path)
    finally:
        hook.remove()
        work.remove()
    records = stats.of()
    assert any(r.computed for r in records) and not all(r.computed for r in records)
    full = max(work.block)
    assert [n == full for n in work.block] == [r.computed for r in records] and min(work.block) == 0
    previous = None
    for record, (img, vec) in zip(records, inputs):
        with torch.no_grad():
            m = _reference_signal(model.double_blocks[0], img, vec)
        if previous is not None:
            expected = float((m - previous).abs().mean() / previous.abs().mean())
            assert record.signal == pytest.approx(expected, rel=1e-5)
        previous = m


def test_easycache_reused_pass_runs_nothing(upstream, model, tmp_path):
    work = BlockWork(model, T.OFFICIAL_STACKS)
    try:
        stats, _ = _main(upstream, "easycache", T.tiny_argv("--easycache-thresh", "5", steps=12), model, tmp_path)
    finally:
        work.remove()
    records = stats.of()
    assert not all(r.computed for r in records)
    for record, total in zip(records, work.total):
        assert (total > 0) == record.computed


def _xdit_at_world_size_one(monkeypatch, sampler):
    """Upstream's own parallelize_transformer, run at world size 1 on CPU: it binds an instance-level forward
    that calls the forward it captured, exactly as under torchrun."""
    import hyvideo.inference as inference

    class NoParallelAttention:  # falsy: the blocks keep using the plain attention path
        def __bool__(self):
            return False

    stub = types.ModuleType("xfuser.core.long_ctx_attention")
    stub.xFuserLongContextAttention = NoParallelAttention
    for name in ("xfuser", "xfuser.core"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "xfuser.core.long_ctx_attention", stub)
    monkeypatch.setattr(inference, "get_sequence_parallel_world_size", lambda: 1, raising=False)
    monkeypatch.setattr(inference, "get_sequence_parallel_rank", lambda: 0, raising=False)
    monkeypatch.setattr(inference, "get_sp_group",
                        lambda: types.SimpleNamespace(all_gather=lambda t, dim: t), raising=False)
    inference.parallelize_transformer(sampler.pipeline)
    return sampler


def test_cache_runs_under_the_xdit_instance_forward(upstream, model, tmp_path, monkeypatch):
    state = {}

    def load(args):
        if "sampler" not in state:
            state["sampler"] = _xdit_at_world_size_one(monkeypatch, T.build_sampler(args, model))
        state["sampler"].args = args
        return state["sampler"]

    calls = T.Calls(model)
    _main(upstream, "magcache", T.tiny_argv("--cache-method", "none"), model, tmp_path, sampler=load)
    xdit_forward = model.__dict__["forward"]
    assert xdit_forward.__func__.__code__.co_name == "new_forward"  # functools.wraps renamed it "forward"
    baseline = list(calls.outputs)

    # What the published scripts do: patch the class. The xDiT instance forward shadows it; it never runs.
    class_calls = []
    original = type(model).forward

    def class_patch(self, *a, **k):
        class_calls.append(1)
        return original(self, *a, **k)
    monkeypatch.setattr(type(model), "forward", class_patch)
    _main(upstream, "magcache", T.tiny_argv("--cache-method", "none", steps=2), model, tmp_path, sampler=load)
    assert class_calls == []
    monkeypatch.setattr(type(model), "forward", original)

    calls.outputs.clear()
    stats, _ = _main(upstream, "magcache", T.tiny_argv("--magcache-thresh", "0"), model, tmp_path, sampler=load)
    assert stats.counts() == (8, 8)
    assert all(torch.equal(a, b) for a, b in zip(calls.outputs, baseline))
    calls.remove()

    work = BlockWork(model, T.OFFICIAL_STACKS)
    stats, _ = _main(upstream, "magcache", T.tiny_argv("--cache-profile", "hunyuanvideo-t2v-720p", steps=50),
                     model, tmp_path, sampler=load)
    work.remove()
    assert stats.pattern() == PUBLISHED_720P_E024K6
    assert work.ran() == PUBLISHED_720P_E024K6
    import stepcache
    stepcache.disable(model)
    assert model.__dict__["forward"] is xdit_forward  # xDiT's binding is back, untouched


def test_magcache_calibration_writes_a_usable_profile(upstream, model, tmp_path):
    """The calibrated ratios are the reference's measurement, checked from outside: mean over image tokens of
    ||r_t|| / ||r_t-1||, r = final-layer input minus img_in output (all passes computed in a calibration run)."""
    h0, residuals = {}, []
    hooks = [model.img_in.register_forward_hook(lambda m, a, out: h0.__setitem__("h", out)),
             model.final_layer.register_forward_pre_hook(lambda m, args: residuals.append(args[0] - h0["h"]))]
    target = tmp_path / "hy-64px-12steps.json"
    try:
        stats, videos = _main(upstream, "magcache", T.tiny_argv("--magcache-calibration", str(target), steps=12),
                              model, tmp_path)
    finally:
        for h in hooks:
            h.remove()
    assert stats is None and len(videos) == 1  # uncached, and the video is still saved
    profile = load_profile(target)
    expected = [1.0] + [round(float((b.norm(dim=-1) / a.norm(dim=-1)).mean()), 5)
                        for a, b in zip(residuals, residuals[1:])]
    assert profile.data["magcache"]["ratios"] == pytest.approx(expected, abs=2e-5)
    assert profile.data["magcache"]["steps"] == 12 and profile.resolution == (64, 64)
    assert profile.has("teacache") and profile.has("easycache")

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResolutionWarning)  # a profile measured at this size: no warning
        stats, _ = _main(upstream, "magcache", T.tiny_argv("--cache-profile", str(target), "--magcache-thresh",
                                                           "0.5", steps=12), model, tmp_path)
    assert stats.counts()[1] == 12
    with pytest.raises(upstream.official.CacheFlagError, match="--magcache-K: not used with --magcache-calibration"):
        upstream.official.parse_args("magcache", T.tiny_argv("--magcache-calibration", "x.json", "--magcache-K", "2"))


# ---------------------------------------------------------------------------- failed runs and missing inputs
def test_seed_command_without_weights_stops_before_building_the_model(upstream, tmp_path):
    """The published command verbatim where nothing was downloaded: one line naming the flag and the path, exit
    2, and no --save-path folder, where upstream would build the 13B transformer before looking for weights."""
    where = tmp_path / "run"
    where.mkdir()
    (where / "hyvideo").symlink_to(upstream.root / "hyvideo")
    (where / SCRIPTS["teacache"]).write_text((HUNYUAN_DIR / SCRIPTS["teacache"]).read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MODEL_BASE", None)

    def run():
        return subprocess.run([sys.executable, SCRIPTS["teacache"], *shlex.split(PUBLISHED_COMMANDS[0][1])],
                              cwd=where, capture_output=True, text=True, env=env, timeout=300)
    result = run()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "teacache_sample_video.py: error: --model-base 'ckpts' does not exist (upstream's sample_video.py "
        "requires it)"]
    (where / "ckpts").mkdir()
    result = run()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "teacache_sample_video.py: error: --dit-weight 'ckpts/hunyuan-video-t2v-720p/transformers/"
        "mp_rank_00_model_states.pt' does not exist"]
    weight = where / "ckpts" / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    weight.parent.mkdir(parents=True)
    weight.write_bytes(b"")
    result = run()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "teacache_sample_video.py: error: --vae 884-16c-hy: 'ckpts/hunyuan-video-t2v-720p/vae/config.json' does "
        "not exist (upstream looks under the MODEL_BASE environment variable, now './ckpts', not under "
        "--model-base)"]
    assert not (where / "teacache_results").exists()


def test_a_failed_run_leaves_no_save_folder(upstream, model, tmp_path, capsys):
    save_path = tmp_path / "results"
    argv = T.tiny_argv("--save-path", str(save_path))

    def out_of_memory(args):
        raise RuntimeError("CUDA out of memory")

    def interrupted(args):
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError, match="out of memory"):
        upstream.official.main("magcache", argv, load=out_of_memory)
    assert not save_path.exists()
    assert upstream.official.main("magcache", argv, load=interrupted) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "magcache_sample_video.py: interrupted; no partial output was kept"]
    assert not save_path.exists()

    def half_written(sample, path):
        Path(path).write_bytes(b"\x00" * 16)
        raise OSError(28, "No space left on device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="No space left"):
            upstream.official.main("magcache", argv, load=lambda args: T.build_sampler(args, model),
                                   save=half_written)
    assert list(save_path.iterdir()) == []  # no half-written video under any name, and no stats


def test_bad_output_paths_fail_before_loading(upstream, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")

    def never(args):
        raise AssertionError("a model was loaded")
    for flags, message in [
            (["--save-path", str(tmp_path / "taken")], f"--save-path '{tmp_path}/taken' is a file; give a folder"),
            (["--save-path", str(tmp_path / "r"), "--cache-stats", str(tmp_path / "taken" / "s.json")],
             "--cache-stats"),
            (["--save-path", str(tmp_path / "r"), "--cache-stats", str(tmp_path / "s.txt")], "must end in .json"),
            (["--save-path", str(tmp_path / "r"), "--magcache-calibration", str(tmp_path / "taken" / "c.json")],
             "--magcache-calibration")]:
        assert upstream.official.main("magcache", T.tiny_argv(*flags), load=never) == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("magcache_sample_video.py: error: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_stats_name_the_one_branch_cond(upstream, model, tmp_path):
    for method in SCRIPTS:
        _main(upstream, method, T.tiny_argv("--cache-stats", str(tmp_path / f"{method}.json")), model, tmp_path)
        record = json.loads((tmp_path / f"{method}.json").read_text())
        assert list(record["branches"]) == ["cond"] and record["branches"]["cond"]["total"] == 8
        assert {p["branch"] for p in record["passes"]} == {"cond"}


class HalfTextEncoder(T.StubTextEncoder):
    """Upstream's text encoders at their default precision (--text-encoder-precision fp16): the pipeline casts
    the prompt embeddings to the encoder's dtype and prepares the step-0 latent in that dtype."""

    def __init__(self, dim, seq):
        super().__init__(dim, seq)
        self.dtype = torch.float16

    def encode(self, tokens, data_type="video", device=None, **kwargs):
        out = super().encode(tokens, data_type, device, **kwargs)
        out.hidden_state = out.hidden_state.half()
        return out


def autocast_on_cpu(model):
    """What CUDA autocast does for upstream on a GPU (it is disabled on the CPU): each layer with weights gets
    its floating inputs in its weights' dtype. Hooks on the layers, inside the cache's forward."""
    def cast(module, args):
        dtype = next(module.parameters(recurse=False)).dtype
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return [m.register_forward_pre_hook(cast) for m in model.modules() if any(True for _ in m.parameters(False))]


@pytest.mark.parametrize("method, flags, steps", [
    ("magcache", ["--cache-profile", "hunyuanvideo-t2v-720p"], 50),
    ("teacache", ["--teacache-thresh", "5"], 12),
    ("easycache", ["--easycache-thresh", "5"], 12)])
def test_fp16_step0_latent_is_one_generation(upstream, model, tmp_path, method, flags, steps):
    """Upstream's pipeline prepares the step-0 latent in the text encoder's dtype (fp16) and its scheduler returns
    fp32 from step 1: one generation all the same, whose stats cover every pass, that reuses passes, and after
    which the cache holds no tensor."""
    def load(args):
        sampler = T.build_sampler(args, model)
        sampler.pipeline.text_encoder = HalfTextEncoder(T.TEXT_DIM, T.TEXT_LEN)
        sampler.text_encoder = sampler.pipeline.text_encoder
        return sampler
    dtypes = []
    hooks = autocast_on_cpu(model)
    hooks.append(model.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype)))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert upstream.official.main(method, T.tiny_argv(*flags, "--save-path", str(tmp_path), steps=steps),
                                          load=load, save=write_sample) == 0
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes[0] == torch.float16 and set(dtypes[1:]) == {torch.float32}  # as upstream runs
    assert not [w for w in caught if issubclass(w.category, NothingCachedWarning)]
    import stepcache
    stats = stepcache.stats(model)
    assert [(r.generation, r.step) for r in stats.of()] == [(1, s) for s in range(steps)]
    assert 0 < stats.counts()[0] < steps
    runner = model._stepcache.runner
    assert not runner.generation_open and runner.branches == {}  # the end-of-generation reset fired
