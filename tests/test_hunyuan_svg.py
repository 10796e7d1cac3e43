"""EasyCache, MagCache and TeaCache over Sparse VideoGen's attention (SVG) in HunyuanVideo: the drop-ins
hunyuan/hyvideo_svg_*.py (stepcache.hunyuan.sparse_videogen) and the CPU reference of SVG's kernels
(stepcache.hunyuan.svg_reference).

Without a checkout: the scripts, the one-line refusal without SVG's package, the checks of SVG's flags and the
masks SVG scores heads with. With SPARSE_VIDEOGEN_REPO (a Sparse-VideoGen checkout at SVG1, 5efea72): a tiny
random-weight SVG HunyuanVideo through SVG's own sampler on the CPU, SVG's attention installed as its script does,
its CUDA kernels replaced by the reference (svg_tiny.py). With EASYCACHE_REPO: the masks and the sparsity formula
against the functions of EasyCache's hyvideo_svg_easycache.py itself, executed from the checkout.
"""
from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import svg_tiny as S
from stepcache.hunyuan import sparse_videogen as D
from stepcache.hunyuan.official import CacheFlagError
from stepcache.runner import NothingCachedWarning

torch.set_num_threads(1)

HUNYUAN_DIR = Path(__file__).resolve().parents[1] / "hunyuan"
SCRIPTS = {m: f"hyvideo_svg_{m}.py" for m in ("easycache", "magcache", "teacache")}
THRESH_FLAG = {"magcache": "--magcache-thresh", "teacache": "--teacache-thresh", "easycache": "--easycache-thresh"}
# EasyCache4HunyuanVideo's README, "SVG with EasyCache", verbatim
PUBLISHED = ['--video-size', '720', '1280', '--video-length', '129', '--infer-steps', '50', '--prompt',
             'A young man at his 20s is sitting on a piece of cloud in the sky, reading a book.',
             '--embedded-cfg-scale', '6.0', '--flow-shift', '7.0', '--flow-reverse', '--use-cpu-offload',
             '--save-path', './results', '--output_path', './results', '--pattern', 'SVG', '--num_sampled_rows', '64',
             '--sparsity', '0.2', '--first_times_fp', '0.055', '--first_layers_fp', '0.025', '--record_attention',
             '--seed', '42']


# --------------------------------------------------------------------------------- without a checkout
@pytest.mark.parametrize("method", SCRIPTS)
def test_svg_scripts_are_thin_entry_points(method):
    source = (HUNYUAN_DIR / SCRIPTS[method]).read_text()
    tree = ast.parse(source)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(i.module, [a.name for a in i.names]) for i in imports] == [
        ("stepcache.hunyuan.sparse_videogen", ["run_script"])]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_script"]
    assert [c.args[0].value for c in calls] == [method]


def _run_python(where: Path, *argv: str) -> subprocess.CompletedProcess:
    """``python ARGV`` run from ``where``, without this process's PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *argv], cwd=where, capture_output=True, text=True, env=env, timeout=300)


def _run_copied_script(where: Path, *argv: str) -> subprocess.CompletedProcess:
    """The script as a user runs it: copied into a folder and run from there (its folder first on sys.path)."""
    (where / SCRIPTS["easycache"]).write_text((HUNYUAN_DIR / SCRIPTS["easycache"]).read_text())
    return _run_python(where, SCRIPTS["easycache"], *argv)


def test_refused_in_one_line_without_svg(tmp_path):
    """No svg package, SVG2's layout, or a requirement of SVG1 missing: one line naming what to do, exit 2, before
    anything else (the published command verbatim, --help alike)."""
    probe = _run_python(tmp_path, "-c",
                        "import importlib.util; s = importlib.util.find_spec('svg'); print(s and s.origin)")
    if probe.stdout.strip() != "None":  # what the script's own process sees, not this one's sys.path
        pytest.skip(f"an svg package is installed in this environment ({probe.stdout.strip()}): the script would "
                    f"find it wherever it is copied")
    prog = "hyvideo_svg_easycache.py: error: "
    for argv in (PUBLISHED, ["--help"]):
        result = _run_copied_script(tmp_path, *argv)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"{prog}Sparse VideoGen's svg package is not importable: copy this script into the root of a "
            f"svg-project/Sparse-VideoGen checkout (SVG1, commit 5efea72 or earlier) and run it from there"]
    # SVG2's layout: an svg.models.hyvideo of other modules (which import flashinfer), no config.py
    (tmp_path / "svg" / "models" / "hyvideo").mkdir(parents=True)
    (tmp_path / "svg" / "__init__.py").write_text("")
    (tmp_path / "svg" / "models" / "hyvideo" / "__init__.py").write_text("")
    (tmp_path / "svg" / "models" / "hyvideo" / "attention.py").write_text("import flashinfer\n")
    result = _run_copied_script(tmp_path, *PUBLISHED)
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(prog) and "has no models/hyvideo/config.py" in line and "check out 5efea72" in line
    # SVG1's layout whose code needs a module that is not installed (flash_attn on a machine without CUDA)
    (tmp_path / "svg" / "__init__.py").write_text("")
    missing = "flash_attn" if S.importlib.util.find_spec("flash_attn") is None else "stepcache_test_not_installed"
    (tmp_path / "svg" / "models" / "hyvideo" / "config.py").write_text(f"import {missing}\n")
    result = _run_copied_script(tmp_path, *PUBLISHED)
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    pip = "flash-attn" if missing == "flash_attn" else missing
    assert line.startswith(prog) and f"needs the Python module {missing!r}" in line and f"pip install {pip} " in line


def published_args(**changes) -> types.SimpleNamespace:
    """The namespace SVG's parser makes of the published command (its defaults for what the command leaves out)."""
    args = types.SimpleNamespace(
        video_size=[720, 1280], video_length=129, vae="884-16c-hy", cfg_scale=1.0, num_videos=1, ulysses_degree=1,
        ring_degree=1, text_len=256, pattern="SVG", num_sampled_rows=64, sample_mse_max_row=10000, sparsity=0.2,
        first_times_fp=0.055, first_layers_fp=0.025, output_path="./results", save_path="./results")
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_published_command_sizes_are_svgs():
    """At the published 720p command the sizes derived from the flags are the ones SVG hard-codes (256 text tokens,
    33 frames of 3600 tokens: attenion.py:51-53, and its script's), and the band is its formula's."""
    plan = D.plan_svg(published_args(), D.refuse)
    assert (plan.context_length, plan.num_frame, plan.frame_size) == (256, 33, 3600)
    assert plan.width == D.sparsity_to_width(0.2, 256, 33, 3600)
    assert plan.band % 128 == 0 and 3 * 3600 < plan.band < 4 * 3600
    assert (plan.num_sampled_rows, plan.sample_mse_max_row) == (64, 10000)
    assert len(plan.notes) == 1 and plan.notes[0].startswith("Sparse VideoGen: 33 frames of 3600 tokens")
    plan = D.plan_svg(published_args(video_size=[544, 960]), D.refuse)
    assert (plan.num_frame, plan.frame_size) == (33, 34 * 60)
    assert D.plan_svg(published_args(pattern="dense", cfg_scale=5.0, sparsity=-1), D.refuse).pattern == "dense"


@pytest.mark.parametrize("changes, flag", [
    ({"cfg_scale": 4.0}, "--cfg-scale"),
    ({"num_videos": 2}, "--num-videos"),
    ({"ulysses_degree": 2}, "--ulysses-degree"),
    ({"ring_degree": 2}, "--ring-degree"),
    ({"video_length": 130}, "--video-length"),
    ({"video_size": [720, 1280, 3]}, "--video-size"),
    ({"first_times_fp": 1.5}, "--first_times_fp"),
    ({"first_layers_fp": float("nan")}, "--first_layers_fp"),
    ({"num_sampled_rows": 0}, "--num_sampled_rows"),
    ({"sample_mse_max_row": 0}, "--sample_mse_max_row"),
    ({"text_len": 0}, "--text-len"),
    ({"sparsity": 0.0}, "--sparsity"),
    ({"sparsity": 1.5}, "--sparsity"),
    ({"sparsity": float("nan")}, "--sparsity"),
    ({"sparsity": 0.005}, "--sparsity"),  # at 720p the text alone takes 0.43%: a band under one 128-token block
])
def test_bad_svg_flags_are_refused(changes, flag):
    with pytest.raises(CacheFlagError) as raised:
        D.plan_svg(published_args(**changes), D.refuse)
    message = str(raised.value)
    assert message.startswith(f"argument {flag}") and "\n" not in message
    assert "allowed" in message


def test_lowest_sparsity_is_the_edge_of_an_empty_band():
    for args in (published_args(), published_args(video_size=[256, 256], video_length=9, text_len=7, sparsity=0.5)):
        plan = D.plan_svg(args, D.refuse)
        lowest = D._lowest_sparsity(plan)
        args.sparsity = lowest
        assert D.plan_svg(args, D.refuse).band >= 128
        args.sparsity = round(lowest - 1e-4, 4)
        with pytest.raises(CacheFlagError, match=f"allowed: {lowest} <= sparsity <= 1"):
            D.plan_svg(args, D.refuse)


def test_a_cap_above_the_sequence_is_the_sequence():
    """SVG samples rows below --sample_mse_max_row from a mask of one row per token: above the sequence it would
    index out of range. Its default (10000) is below every published size; at a small one the cap is the
    sequence, and the plan says so."""
    plan = D.plan_svg(published_args(video_size=[256, 256], video_length=9, text_len=7, sparsity=0.5), D.refuse)
    assert plan.seq_len == S.SEQ and plan.sample_mse_max_row == S.SEQ
    assert any("sampled among all 775" in note for note in plan.notes)


def test_sample_masks_are_svgs_bands():
    """Spot checks derived by hand from SVG's script (get_attention_mask): 128-token blocks less than
    frame_size * 1.5 // 128 = 3 blocks apart, in frame-major order (spatial) or token-major order (temporal); text
    rows and columns always kept."""
    ctx, frames, size = 3, 3, 256
    spatial, temporal = D.sample_masks(ctx, frames, size, rows=10_000)
    seq = ctx + frames * size
    assert spatial.shape == temporal.shape == (seq, seq) and spatial.dtype == torch.bool
    assert spatial[0, 383] and not spatial[0, 384]  # blocks 0 and 2 / 0 and 3
    assert spatial[300, 0] and spatial[300, 639] and not spatial[300, 640]  # block 2 with 0, 4 and 5
    token = lambda frame, patch: frame * size + patch  # noqa: E731
    # temporal: (frame 0, patch 0) sits at 0 in token-major order, (frame 2, patch 0) at 2: same block
    assert temporal[token(0, 0), token(2, 0)] and not spatial[token(0, 0), token(2, 0)]
    # (frame 0, patch 200) sits at 600 in token-major order: block 4, too far from block 0
    assert not temporal[token(0, 0), token(0, 200)] and spatial[token(0, 0), token(0, 200)]
    assert temporal[token(0, 0), token(2, 127)]  # token-major 383: block 2
    for mask in (spatial, temporal):
        assert mask[:, -ctx:].all() and mask[-ctx:, :].all() and torch.equal(mask, mask.T)
    assert torch.equal(D.sample_masks(ctx, frames, size, rows=100)[1], temporal[:100])


def test_svg_copy_reads_teacache_signal_beside_its_model():
    """TeaCache's signal uses upstream's ``modulate``: for SVG's copy, its own (the run may have no Tencent
    ``hyvideo`` at all); Tencent's model and HunyuanVideo 1.5's adapter are unchanged."""
    from stepcache.hunyuan.official_adapter import HYVideoAdapter
    from stepcache.hunyuan15.official_adapter import HYVideo15Adapter

    def model_of(module):
        return type("HYVideoDiffusionTransformer", (), {"__module__": module})()
    adapter = HYVideoAdapter()
    assert adapter.modulate_module_of(model_of("svg.models.hyvideo.modules.models")) == \
        "svg.models.hyvideo.modules.modulate_layers"
    assert adapter.modulate_module_of(model_of("hyvideo.modules.models")) == "hyvideo.modules.modulate_layers"
    hy15 = HYVideo15Adapter()
    assert hy15.modulate_module_of(model_of("hyvideo.models.transformers.hunyuanvideo_1_5_transformer")) == \
        HYVideo15Adapter.modulate_module


# ------------------------------------------------------------------------------- EasyCache's own functions
def published_functions(root: Path, rows: int) -> types.SimpleNamespace:
    """``sparsity_to_width`` and ``get_attention_mask`` of EasyCache's hyvideo_svg_easycache.py, executed from the
    checkout. The mask function hard-codes 720p sizes (and would fill 57 GB): its three size assignments become
    parameters and its ``.cuda()`` stays on the CPU; nothing else of it changes."""
    path = root / S.EASYCACHE["marker_file"]
    tree = ast.parse(path.read_text())
    width = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sparsity_to_width")
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    mask = next(n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n.name == "get_attention_mask")
    sizes = ("context_length", "num_frame", "frame_size")
    mask.body = [s for s in mask.body if not (isinstance(s, ast.Assign) and len(s.targets) == 1
                                              and getattr(s.targets[0], "id", None) in sizes)]
    mask.args.args += [ast.arg(arg=name) for name in sizes]

    class OnCpu(ast.NodeTransformer):
        def visit_Call(self, node):
            self.generic_visit(node)
            if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
                return node.func.value
            return node
    module = ast.fix_missing_locations(ast.Module(body=[width, OnCpu().visit(mask)], type_ignores=[]))
    namespace = {"math": math, "torch": torch, "device": "cpu",
                 "args": types.SimpleNamespace(sample_mse_max_row=rows)}
    exec(compile(module, str(path), "exec"), namespace)
    return types.SimpleNamespace(**namespace)


@pytest.mark.parametrize("sizes, rows", [((7, 3, 256), 10_000), ((7, 3, 256), 100), ((5, 4, 200), 900),
                                         ((16, 2, 300), 650)])
def test_masks_and_width_are_easycaches_own(sizes, rows):
    published = published_functions(S.easycache_checkout(), rows)
    ours = D.sample_masks(*sizes, rows=rows)
    for mask, name in zip(ours, ("spatial", "temporal")):
        assert torch.equal(mask, published.get_attention_mask(name, *sizes) != 0), name
    for sparsity in (0.2, 0.5, 1.0):
        assert D.sparsity_to_width(sparsity, 256, 33, 3600) == published.sparsity_to_width(sparsity, 256, 33, 3600)
        assert D.sparsity_to_width(sparsity, *sizes) == published.sparsity_to_width(sparsity, *sizes)


# --------------------------------------------------------------------------------- with an SVG checkout
@pytest.fixture(scope="module")
def svg():
    root = S.sparse_videogen_checkout()
    with S.svg_on_cpu(root) as modules:
        modules.driver = D.import_svg()
        yield modules


@pytest.fixture
def model(svg):
    return S.build_model(svg)


class Probe:
    """Per transformer call: SVG's sparse attention calls (``attention_core_logic``) and the head kinds its
    ``sample_mse`` chose; the call's output. Wraps SVG's class methods (which the drop-in does not set)."""

    def __init__(self, svg, model):
        self.attn = svg.attenion.Hunyuan_SparseAttn
        self.saved = {name: self.attn.__dict__[name] for name in ("attention_core_logic", "sample_mse")}
        self.sparse, self.kinds, self.outputs = [], set(), []
        core, sample = (self.saved[name].__func__ for name in ("attention_core_logic", "sample_mse"))

        def attention_core_logic(cls, *args, **kwargs):
            self.sparse[-1] += 1
            return core(cls, *args, **kwargs)

        def sample_mse(cls, *args, **kwargs):
            mses = sample(cls, *args, **kwargs)
            self.kinds.update(torch.argmin(mses, dim=0).flatten().tolist())
            return mses
        self.attn.attention_core_logic = classmethod(attention_core_logic)
        self.attn.sample_mse = classmethod(sample_mse)
        self.handles = [model.register_forward_pre_hook(lambda m, a: self.sparse.append(0)),
                        model.register_forward_hook(lambda m, a, out: self.outputs.append(out["x"].clone()))]

    def remove(self):
        for name, value in self.saved.items():
            setattr(self.attn, name, value)
        for handle in self.handles:
            handle.remove()


def write_sample(sample, path):
    Path(path).write_bytes(sample.numpy().tobytes())


def run(svg, model, method, argv, tmp_path, sampler=None):
    """One drop-in run in-process on the tiny model, the global RNG (SVG's row sampling) seeded first: (its stats
    record or None, the probe)."""
    stats = tmp_path / f"stats-{len(list(tmp_path.glob('stats-*')))}.json"
    has_cache = "--cache-method" not in argv or argv[argv.index("--cache-method") + 1] != "none"
    probe = Probe(svg, model)
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingCachedWarning)
            rc = D.main(method, [*argv, "--save-path", str(tmp_path / "videos"),
                                 *(["--cache-stats", str(stats)] if has_cache else [])],
                        load=sampler or (lambda args: S.build_sampler(args, model)), save=write_sample)
    finally:
        probe.remove()
    assert rc == 0
    return (json.loads(stats.read_text()) if has_cache else None), probe


def test_reference_attention_is_flex_attention_with_svgs_block_mask(svg):
    """The reference's SDPA with the dense mask computes what PyTorch's flex_attention computes with the block
    mask SVG builds from the same mask function (flex_attention run eagerly, on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from stepcache.hunyuan.svg_reference import prepare_dense_mask, sdpa_sparse
    for context, prompt, frames, size, width in [(7, 5, 3, 256, 0.85), (16, 9, 4, 200, 1.7), (7, 7, 3, 256, 2.4)]:
        seq = context + frames * size
        mask_mod = svg.utils.generate_temporal_head_mask_mod(context, prompt, frames, size, mul=width)
        block_mask = svg.utils.create_block_mask_cached(mask_mod, None, None, seq, seq, device="cpu")
        dense = prepare_dense_mask(1, 4, 16, torch.float32, "cpu", context, prompt, frames, size, diag_width=width,
                                   multiplier=width)
        assert 0 < dense.float().mean() < 1
        q, k, v = (torch.randn(1, 4, seq, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            expected = flex_attention(q, k, v, block_mask=block_mask)
        torch.testing.assert_close(sdpa_sparse(None, q, k, v, dense), expected, rtol=1e-5, atol=1e-5)


def test_svg_core_with_reference_is_svg_core_with_flex_attention(svg):
    """SVG's whole sparse attention (head classification, reordering, attention, reordering back) with the
    reference, against the same code with PyTorch's flex_attention and SVG's block mask in the kernel's place."""
    from torch.nn.attention.flex_attention import flex_attention

    from stepcache.hunyuan.svg_reference import prepare_dense_mask
    attn = svg.attenion.Hunyuan_SparseAttn
    context, prompt, frames, size, width = 7, 5, 3, 256, 0.85
    seq = context + frames * size
    settings = dict(attention_masks=D.sample_masks(context, frames, size, seq), num_sampled_rows=64,
                    sample_mse_max_row=seq, context_length=context, num_frame=frames, frame_size=size)
    saved = {name: attn.__dict__[name] for name in (*settings, "block_mask", "sparse_flex_attention")}
    q, k, v = (torch.randn(1, 8, seq, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    try:
        for name, value in settings.items():
            setattr(attn, name, value)
        attn.block_mask = prepare_dense_mask(1, 8, 16, torch.float32, "cpu", context, prompt, frames, size, width,
                                             width)
        torch.manual_seed(0)
        mses = attn.sample_mse(q, k, v)
        kinds = set(torch.argmin(mses, dim=0).flatten().tolist())
        torch.manual_seed(0)
        reference = attn.attention_core_logic(q, k, v, 1.0, 5, None, None, None, None)
        mask_mod = svg.utils.generate_temporal_head_mask_mod(context, prompt, frames, size, mul=width)
        attn.block_mask = svg.utils.create_block_mask_cached(mask_mod, None, None, seq, seq, device="cpu")
        attn.sparse_flex_attention = classmethod(lambda cls, q, k, v, block_mask: flex_attention(
            q, k, v, block_mask=block_mask))
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex = attn.attention_core_logic(q, k, v, 1.0, 5, None, None, None, None)
    finally:
        for name, value in saved.items():
            setattr(attn, name, value)
    assert kinds == {0, 1}  # both spatial and temporal heads: both placements are exercised
    torch.testing.assert_close(reference, flex, rtol=1e-5, atol=1e-5)


def test_help_lists_svgs_flags_and_ours(svg):
    text = D.build_parser("easycache", svg.driver).format_help()
    listed = {word.rstrip(",") for word in text.split() if word.startswith("--")}
    assert {"--pattern", "--sparsity", "--num_sampled_rows", "--first_times_fp", "--first_layers_fp",
            "--sample_mse_max_row", "--output_path", "--record_attention", "--video-size", "--flow-reverse",
            "--easycache-thresh", "--magcache-thresh", "--teacache-thresh", "--cache-method", "--cache-stats"} <= listed
    assert "Leave the first 10% timestep in FP" in " ".join(text.split())  # SVG's own --help fails on this "%"


def test_published_command_parses(svg):
    args, plan, svg_plan = D.parse_args("easycache", PUBLISHED, svg.driver)
    assert plan.method == "easycache" and plan.config.params["thresh"] == 0.025
    assert plan.config.params["warmup_steps"] == 5
    assert (svg_plan.pattern, svg_plan.num_frame, svg_plan.frame_size, svg_plan.context_length) == ("SVG", 33, 3600,
                                                                                                     256)
    assert (svg_plan.first_times_fp, svg_plan.first_layers_fp, svg_plan.num_sampled_rows) == (0.055, 0.025, 64)
    for method in ("magcache", "teacache"):
        assert D.parse_args(method, PUBLISHED, svg.driver)[1].method == method


def test_bad_flags_fail_before_loading(svg, capsys):
    def never(args):
        raise AssertionError("a model was loaded")
    bad = [(["--sparsity", "0.01"], "--sparsity"), (["--cfg-scale", "5"], "--cfg-scale"),
           (["--first_times_fp", "2"], "--first_times_fp"), (["--num_sampled_rows", "0"], "--num_sampled_rows"),
           (["--pattern", "sparse"], "--pattern"), (["--easycache-thresh", "-1"], "--easycache-thresh"),
           (["--magcache-K", "0", "--cache-method", "magcache"], "--magcache-K"),
           (["--ulysses-degree", "2"], "--ulysses-degree")]
    for argv, flag in bad:
        assert _exit_status(lambda: D.main("easycache", S.tiny_argv(*argv), load=never)) == 2, argv
        err = capsys.readouterr().err
        assert flag in err.strip().splitlines()[-1], (argv, err)
    # the published command where nothing was downloaded: one line, the first file upstream's loader would open
    assert D.main("easycache", PUBLISHED) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hyvideo_svg_easycache.py: error: ") and "--model-base" in line


def _exit_status(call) -> int:
    try:
        return call()
    except SystemExit as exc:
        return exc.code


def test_threshold_zero_with_svg_is_svg_alone(svg, model, tmp_path):
    """Every method at threshold 0 over SVG's attention gives SVG alone's outputs, pass by pass, bit for bit; SVG's
    sparse attention ran (its outputs differ from dense attention's), with spatial and temporal heads."""
    _, dense = run(svg, model, "easycache", S.tiny_argv("--cache-method", "none", pattern="dense"), tmp_path)
    _, alone = run(svg, model, "easycache", S.tiny_argv("--cache-method", "none"), tmp_path)
    assert sum(dense.sparse) == 0 and sum(alone.sparse) > 0 and alone.kinds == {0, 1}
    assert len(alone.outputs) == S.STEPS
    assert not all(torch.equal(a, b) for a, b in zip(dense.outputs, alone.outputs))
    for method in SCRIPTS:
        record, cached = run(svg, model, method, S.tiny_argv(THRESH_FLAG[method], "0"), tmp_path)
        assert record["pattern"] == "C" * S.STEPS
        assert cached.sparse == alone.sparse
        assert all(torch.equal(a, b) for a, b in zip(cached.outputs, alone.outputs)), method


@pytest.mark.parametrize("method, flags", [("magcache", ["--magcache-thresh", "0.5", "--retention-ratio", "0.2"]),
                                           ("teacache", ["--teacache-thresh", "5"]),
                                           ("easycache", ["--easycache-thresh", "5"])])
def test_computed_passes_use_svg_and_reused_passes_skip_it(svg, model, tmp_path, method, flags):
    """Where the cache computes a pass, SVG's sparse attention runs in it as in SVG alone; a reused pass runs no
    attention. (Installed the other way round, the cache would hold the blocks' dense forwards and every computed
    pass would run dense.)"""
    _, alone = run(svg, model, method, S.tiny_argv("--cache-method", "none", steps=12), tmp_path)
    record, cached = run(svg, model, method, S.tiny_argv(*flags, steps=12), tmp_path)
    computed = [p["computed"] for p in record["passes"]]
    assert not all(computed) and any(computed[4:])
    for step, was_computed in enumerate(computed):
        assert cached.sparse[step] == (alone.sparse[step] if was_computed else 0), (step, cached.sparse)
    assert sum(alone.sparse[4:]) > 0  # past the dense first timesteps, SVG's layers are sparse


def _record_inputs(svg, model, tmp_path, steps):
    """The transformer's inputs of one dense, uncached generation, to feed the same inputs to other runs."""
    inputs = []

    def clone(value):
        return value.clone() if isinstance(value, torch.Tensor) else value
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()})),
        with_kwargs=True)
    try:
        run(svg, model, "teacache", S.tiny_argv("--cache-method", "none", pattern="dense", steps=steps), tmp_path)
    finally:
        hook.remove()
    return inputs


def _replay(svg, model, method, flags, pattern, inputs):
    """The recorded inputs through ``model`` with ``method`` over dense or SVG attention, installed by the
    drop-in's own steps: (stats, outputs)."""
    import stepcache
    steps = len(inputs)
    args, plan, svg_plan = D.parse_args(method, S.tiny_argv(*flags, pattern=pattern, steps=steps), svg.driver)
    installed = D.install_svg(S.build_sampler(args, model), args, svg_plan, svg.driver)
    try:
        cached = plan.enable(model, steps)
        cached.start_generation(steps, args.embedded_cfg_scale)
        torch.manual_seed(0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingCachedWarning)
            outputs = [model(*a, **k)["x"] for a, k in inputs]
        return stepcache.stats(model).to_dict(), outputs
    finally:
        stepcache.disable(model)
        installed.remove()


def test_decisions_on_the_same_inputs_do_not_depend_on_the_attention(svg, model, tmp_path):
    """TeaCache's signal is block 0's modulated input, computed before any attention: on the same inputs it takes
    the same decisions with dense and with SVG attention. MagCache decides from the step alone: the same pattern in
    whole runs. EasyCache reads the model's output (its rate and output scale): SVG changes its signal, and only its
    forced passes are the same."""
    inputs = _record_inputs(svg, model, tmp_path, steps=12)
    assert len(inputs) == 12
    tea = {p: _replay(svg, model, "teacache", ["--teacache-thresh", "0.4"], p, inputs) for p in ("dense", "SVG")}
    (dense, dense_out), (sparse, sparse_out) = tea["dense"], tea["SVG"]
    assert [p["signal"] for p in dense["passes"]] == [p["signal"] for p in sparse["passes"]]
    assert dense["pattern"] == sparse["pattern"] and "." in dense["pattern"] and "C" in dense["pattern"][1:-1]
    assert not all(torch.equal(a, b) for a, b in zip(dense_out, sparse_out))  # SVG was in effect

    easy = [_replay(svg, model, "easycache", ["--easycache-thresh", "1"], p, inputs)[0] for p in ("dense", "SVG")]
    assert all("." in run["pattern"] for run in easy)
    forced = [[(i, p["reason"]) for i, p in enumerate(run["passes"]) if p["reason"] in ("warmup", "forced-last")]
              for run in easy]
    assert forced[0] == forced[1] and len(forced[0]) == 6  # 5 warm-up steps and the last
    accumulated = [[p["accumulator"] for p in run["passes"]] for run in easy]
    assert accumulated[0] != accumulated[1]  # from the rate measured on the first sparse outputs

    mag = [run(svg, model, "magcache", S.tiny_argv("--magcache-thresh", "0.5", pattern=p, steps=12), tmp_path)[0]
           for p in ("dense", "SVG")]
    assert mag[0]["pattern"] == mag[1]["pattern"] and "." in mag[0]["pattern"]


def test_nothing_is_left_installed_after_a_run(svg, model, tmp_path):
    """After a run, SVG's classes are as imported and the model has no cache: a dense run after an SVG run is the
    dense run before it, bit for bit."""
    attn = svg.attenion.Hunyuan_SparseAttn
    before = dict(vars(attn))
    forwards = (svg.models.MMDoubleStreamBlock.forward, svg.models.MMSingleStreamBlock.forward)
    _, first = run(svg, model, "easycache", S.tiny_argv("--cache-method", "none", pattern="dense"), tmp_path)
    run(svg, model, "easycache", S.tiny_argv("--easycache-thresh", "5"), tmp_path)
    assert dict(vars(attn)) == before
    assert (svg.models.MMDoubleStreamBlock.forward, svg.models.MMSingleStreamBlock.forward) == forwards
    assert getattr(model, "_stepcache", None) is None and "forward" not in vars(model)
    assert all(block.sparse_args is None and "forward" not in vars(block)
               for block in (*model.double_blocks, *model.single_blocks))
    _, again = run(svg, model, "easycache", S.tiny_argv("--cache-method", "none", pattern="dense"), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first.outputs, again.outputs))


def test_a_failed_run_takes_svg_and_the_cache_off(svg, model, tmp_path):
    attn = svg.attenion.Hunyuan_SparseAttn
    before = dict(vars(attn))

    def failing(sample, path):
        raise OSError(28, "No space left on device")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="No space left"):
            D.main("easycache", [*S.tiny_argv("--easycache-thresh", "5"), "--save-path", str(tmp_path / "v")],
                   load=lambda args: S.build_sampler(args, model), save=failing)
    assert dict(vars(attn)) == before and getattr(model, "_stepcache", None) is None
    assert not (tmp_path / "v").exists() or list((tmp_path / "v").iterdir()) == []
