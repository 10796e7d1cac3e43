"""The drop-in scripts for the official Wan2.1 repo, on upstream's own code (``WAN21_REPO``) with a tiny WanModel.

Upstream's ``WanT2V.generate`` / ``WanI2V.generate`` sampling loops and its ``generate.py`` (parser, checks, saving)
run unchanged; only checkpoint loading, flash-attention and torchvision stand in (see wan_official_tiny.py).
"""
import copy
import json
import os
import shlex
import warnings

import pytest
import torch

from helpers import BlockWork, wan21_checkout
from wan_official_tiny import (TINY_SIZE, bare_sampler, checkpoint_layout, fake_constructors, make_image, run_i2v,
                               run_t2v, tiny_model, up)  # up: the fixture of upstream on the CPU

REPO = str(wan21_checkout())
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")]

from stepcache.profiles import load_profile  # noqa: E402
from stepcache.runner import NothingCachedWarning  # noqa: E402
from stepcache.wan21.official import attach  # noqa: E402
from stepcache.wan21.official_generate import main, make_plan, split_argv, upstream_args  # noqa: E402

PROFILES = {"t2v": "wan2.1-t2v-1.3b", "i2v": "wan2.1-i2v-14b-480p"}
# Settings under which each method reuses passes on the tiny random model at 8 steps. Its random time embedding
# changes far more per step than a trained one, so TeaCache needs a far larger budget than published ones.
REUSING = {"magcache": dict(thresh=0.24, K=4, retention_ratio=0.2), "teacache": dict(thresh=500.0),
           "easycache": dict(thresh=0.3, warmup_steps=2)}
# The published MagCache schedule for T2V-1.3B at 0.12 / K4 / R0.2, 50 steps (42/100, as MagCache4Wan2.1's released code computes it).
PUBLISHED_42 = ("CCCCCCCCCCCCCCCCCCCC........CC........CC........CC........CC........CC......CC....CC....CC..CC.."
                "CCCC")

# The published commands, verbatim (MagCache4Wan2.1, TeaCache4Wan2.1 and EasyCache4Wan2.1 READMEs).
MAGCACHE_COMMANDS = [
    """python magcache_generate.py  --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B --prompt "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage." --base_seed 42 --offload_model True --t5_cpu --use_magcache --magcache_K 4 --retention_ratio 0.2 --magcache_thresh 0.12""",  # noqa: E501
    """python magcache_generate.py  --task t2v-14B --size 1280*720 --ckpt_dir ./Wan2.1-T2V-14B  --prompt "The video shows two astronauts in bulky suits walking slowly on the moonâ€™s surface, against a vast starry universe. Their steps are heavy and slow, kicking up dust in the low-gravity environment. The scene is silent, mysterious, and evokes the courage and dreams of space exploration." --base_seed 0 --offload_model True --t5_cpu  --use_magcache --magcache_K 6 --retention_ratio 0.2 --magcache_thresh 0.24""",  # noqa: E501
    """python magcache_generate.py --task i2v-14B \\
    --size 832*480 \\
    --ckpt_dir ./Wan2.1-I2V-14B-480P \\
    --image examples/wan_i2v_2.png \\
    --use_magcache \\
    --magcache_K 6 \\
    --magcache_thresh 0.24 \\
    --retention_ratio 0.2 \\
    --base_seed 0 \\
    --prompt "A woman in black lace stands confidently in a dim Art Deco interior with polished marble floors. Stark chiaroscuro lighting highlights her sharp features as she tilts her head, crimson lips parting in a knowing smile. Her smoldering gaze meets the viewer while she turns gracefully, lace casting shifting shadows on the walls. A medium shot with a subtle dolly zoom, framed by velvet drapes, adds depth. The mysterious, refined atmosphere blends modern elegance with vintage Hollywood glamour, rendered in 8K hyper-realistic detail, metallic gold accents glowing in the soft light.\"""",  # noqa: E501
    """python magcache_generate.py --task i2v-14B \\
    --size 1280*720 \\
    --ckpt_dir ./Wan2.1-I2V-14B-720P \\
    --image examples/wan_i2v.png \\
    --magcache_calibration \\
    --offload_model True \\
    --t5_cpu \\
    --frame_num 61 \\
    --base_seed 0 \\
    --prompt "A woman in black lace stands confidently in a dim Art Deco interior with polished marble floors. Stark chiaroscuro lighting highlights her sharp features as she tilts her head, crimson lips parting in a knowing smile. Her smoldering gaze meets the viewer while she turns gracefully, lace casting shifting shadows on the walls. A medium shot with a subtle dolly zoom, framed by velvet drapes, adds depth. The mysterious, refined atmosphere blends modern elegance with vintage Hollywood glamour, rendered in 8K hyper-realistic detail, metallic gold accents glowing in the soft light.\"""",  # noqa: E501
]
_CATS = '"Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."'
_BEACH = ('"Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline '
          'gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background '
          'featuring crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat '
          'assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot '
          'highlights the feline\'s intricate details and the refreshing atmosphere of the seaside."')
TEACACHE_COMMANDS = [
    f"python teacache_generate.py  --task t2v-1.3B --size 832*480 --ckpt_dir ./Wan2.1-T2V-1.3B --prompt {_CATS} "
    f"--base_seed 42 --offload_model True --t5_cpu --teacache_thresh 0.08",
    f"python teacache_generate.py  --task t2v-14B --size 1280*720 --ckpt_dir ./Wan2.1-T2V-14B  --prompt {_CATS} "
    f"--base_seed 42 --offload_model True --t5_cpu  --teacache_thresh 0.2",
    f"python teacache_generate.py --task i2v-14B --size 832*480 --ckpt_dir ./Wan2.1-I2V-14B-480P --image "
    f"examples/i2v_input.JPG --prompt {_BEACH} --base_seed 42 --offload_model True --t5_cpu --teacache_thresh 0.26",
    f"python teacache_generate.py --task i2v-14B --size 1280*720 --ckpt_dir ./Wan2.1-I2V-14B-720P --image "
    f"examples/i2v_input.JPG --prompt {_BEACH} --base_seed 42 --offload_model True --t5_cpu --frame_num 61  "
    f"--teacache_thresh 0.3",
    f"python teacache_generate.py  --task t2v-14B --size 1280*720 --ckpt_dir ./Wan2.1-T2V-14B  --prompt {_CATS} "
    f"--base_seed 42 --offload_model True --t5_cpu  --teacache_thresh 0.3 --use_ret_steps",
]
EASYCACHE_COMMANDS = [
    """python easycache_generate.py \\
	--task t2v-14B \\
	--size "1280*720" \\
	--ckpt_dir ./Wan2.1-T2V-14B \\
	--prompt "A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage. She wears a black leather jacket, a long red dress, and black boots, and carries a black purse. She wears sunglasses and red lipstick. She walks confidently and casually. The street is damp and reflective, creating a mirror effect of the colorful lights. Many pedestrians walk about." \\
	--base_seed 0""",  # noqa: E501
    """python easycache_generate.py \\
	--task i2v-14B \\
	--size "1280*720" \\
	--ckpt_dir ./Wan2.1-I2V-14B-720P \\
	--image examples/grogu.png \\
	--prompt "A cute green alien child with large ears, wearing a brown robe, sits on a chair and eats a blue cookie at a table, with crumbs scattered on the robe, in a cozy indoor setting." \\
	--base_seed 0""",  # noqa: E501
]
# (script, command index) -> (method, profile, params) the plan must hold.
EXPECTED = {
    ("magcache", 0): ("magcache", "wan2.1-t2v-1.3b", {"thresh": 0.12, "K": 4, "retention_ratio": 0.2}),
    ("magcache", 1): ("magcache", "wan2.1-t2v-14b", {"thresh": 0.24, "K": 6, "retention_ratio": 0.2}),
    ("magcache", 2): ("magcache", "wan2.1-i2v-14b-480p", {"thresh": 0.24, "K": 6, "retention_ratio": 0.2}),
    ("magcache", 3): (None, None, {}),  # calibration: uncached, measuring
    ("teacache", 0): ("teacache", "wan2.1-t2v-1.3b", {"thresh": 0.08, "variant": "default"}),
    ("teacache", 1): ("teacache", "wan2.1-t2v-14b", {"thresh": 0.2, "variant": "default"}),
    ("teacache", 2): ("teacache", "wan2.1-i2v-14b-480p", {"thresh": 0.26, "variant": "default"}),
    ("teacache", 3): ("teacache", "wan2.1-i2v-14b-720p", {"thresh": 0.3, "variant": "default"}),
    ("teacache", 4): ("teacache", "wan2.1-t2v-14b", {"thresh": 0.3, "variant": "use_ret_steps"}),
    ("easycache", 0): ("easycache", "wan2.1-t2v-14b", {"thresh": 0.05, "warmup_steps": 10}),
    ("easycache", 1): ("easycache", "wan2.1-i2v-14b-720p", {"thresh": 0.05, "warmup_steps": 10}),
}
COMMANDS = {"magcache": MAGCACHE_COMMANDS, "teacache": TEACACHE_COMMANDS, "easycache": EASYCACHE_COMMANDS}


def command_argv(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "))[2:]  # the shell joins continued lines; drop "python x.py"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("img") / "first.png")


@pytest.fixture(scope="module")
def baselines(up, image):
    return {"t2v": run_t2v(bare_sampler(up, "t2v", tiny_model(up, "t2v")), steps=8),
            "i2v": run_i2v(bare_sampler(up, "i2v", tiny_model(up, "i2v")), image, steps=8)}


def run(kind, sampler, image, steps=8):
    return run_t2v(sampler, steps=steps) if kind == "t2v" else run_i2v(sampler, image, steps=steps)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_threshold_zero_is_bit_identical_to_upstream(up, image, baselines, kind, method):
    sampler = bare_sampler(up, kind, tiny_model(up, kind))
    work = BlockWork(sampler.model)
    attachment = attach(sampler, method, PROFILES[kind], {**REUSING[method], "thresh": 0.0})
    with pytest.warns(NothingCachedWarning, match="a threshold of 0 disables reuse"):
        out = run(kind, sampler, image)
    assert torch.equal(out, baselines[kind])
    assert attachment.cached.stats.counts() == (16, 16) and work.passes == 16
    assert attachment.cached.stats.branches() == ["cond", "uncond"]
    attachment.remove()
    assert "forward" not in attachment.model.__dict__ and "generate" not in sampler.__dict__
    assert all("forward" not in b.__dict__ for b in sampler.model.blocks)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_reused_passes_run_no_block(up, image, baselines, kind, method):
    sampler = bare_sampler(up, kind, tiny_model(up, kind))
    work = BlockWork(sampler.model)
    attachment = attach(sampler, method, PROFILES[kind], REUSING[method])
    out = run(kind, sampler, image)
    computed, total = attachment.cached.stats.counts()
    assert total == 16 and 0 < computed < total
    assert work.passes == computed  # counted inside the blocks, not by the cache
    assert torch.isfinite(out).all() and not torch.equal(out, baselines[kind])
    record = attachment.generations[-1]
    assert record.dit_calls == 16 and record.dit_seconds > 0 and record.pixel_size == (64, 64)


def test_easycache_reused_pass_returns_latent_plus_cached_transformation(up, image):
    """A reused pass returns ``x + (v - x)`` of its branch's last computed pass, as upstream's list of latents."""
    sampler = bare_sampler(up, "i2v", tiny_model(up, "i2v"))
    attachment = attach(sampler, "easycache", PROFILES["i2v"], REUSING["easycache"])
    seen = []
    attachment.model.register_forward_hook(lambda m, a, k, out: seen.append((k["context"], a[0][0], out)),
                                           with_kwargs=True)
    run_i2v(sampler, image)
    records = attachment.cached.stats.of()
    last = {}
    reused = 0
    for (context, x, out), record in zip(seen, records):
        assert isinstance(out, list) and len(out) == 1 and out[0].shape == x.shape == (16, 2, 8, 8)
        if record.computed:
            last[record.branch] = out[0] - x
        else:
            reused += 1
            assert torch.equal(out[0], (x + last[record.branch]).float())
    assert reused > 0


@pytest.mark.parametrize("variant, module", [("default", "time_embedding"), ("use_ret_steps", "time_projection")])
def test_teacache_signal_is_upstreams_e_or_e0(up, variant, module):
    sampler = bare_sampler(up, "t2v", tiny_model(up, "t2v"))
    attachment = attach(sampler, "teacache", PROFILES["t2v"], {"thresh": 0.0, "variant": variant})
    outputs = []
    getattr(attachment.model, module).register_forward_hook(lambda m, i, out: outputs.append(out))
    with pytest.warns(NothingCachedWarning):
        run_t2v(sampler, steps=8)
    cond = [r for r in attachment.cached.stats.of() if r.branch == "cond"]
    signals = outputs[0::2]
    for step in range(1, 8):
        prev, cur = signals[step - 1], signals[step]
        assert cond[step].signal == pytest.approx(float((cur - prev).abs().mean() / prev.abs().mean()), rel=1e-6)


def test_branches_are_named_by_context_not_by_call_order(up):
    sampler = bare_sampler(up, "t2v", tiny_model(up, "t2v"))
    attachment = attach(sampler, "magcache", PROFILES["t2v"], {"thresh": 0.0, "K": 2, "retention_ratio": 0.2})
    model, g = attachment.model, torch.Generator().manual_seed(0)
    cond, uncond = [torch.randn(6, 32, generator=g)], [torch.randn(5, 32, generator=g)]
    attachment.cached.start_generation(3)
    attachment.adapter.start_generation()
    x = [torch.randn(16, 2, 8, 8, generator=g)]
    order = [cond, uncond, uncond, cond, cond, uncond]  # the second step calls uncond first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingCachedWarning)
        for step, context in enumerate(order):
            model(x, t=torch.tensor([900.0 - 300 * (step // 2)]), context=context, seq_len=32)
    records = attachment.cached.stats.of()
    assert [(r.branch, r.step) for r in records] == [("cond", 0), ("uncond", 0), ("uncond", 1), ("cond", 1),
                                                      ("cond", 2), ("uncond", 2)]


# ------------------------------------------------------------------------------------------- the scripts
@pytest.fixture
def script(up, monkeypatch, tmp_path):
    """Upstream's generate.py as the scripts see it, with the tiny samplers behind ``wan.WanT2V`` / ``wan.WanI2V``,
    a 64*64 size added to its size tables, and videos saved with torch.save."""
    g = up.generate
    monkeypatch.setitem(g.SIZE_CONFIGS, TINY_SIZE, (64, 64))
    monkeypatch.setitem(g.MAX_AREA_CONFIGS, TINY_SIZE, 64 * 64)
    for task in ("t2v-1.3B", "t2v-14B", "i2v-14B", "flf2v-14B"):
        monkeypatch.setitem(g.SUPPORTED_SIZES, task, tuple(g.SUPPORTED_SIZES[task]) + (TINY_SIZE,))

    def save(tensor, save_file, **kwargs):
        """Upstream's cache_video contract: write the file, return its name."""
        os.makedirs(os.path.dirname(save_file) or ".", exist_ok=True)
        torch.save(tensor.clone(), save_file)
        return save_file

    monkeypatch.setattr(g, "cache_video", save)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # upstream calls it under offload_model
    made, counters = [], []

    def count(model):
        counters.append(BlockWork(model))
        return model

    for name, build in fake_constructors(up, made, wrap=count).items():
        monkeypatch.setattr(up.wan, name, build, raising=False)
    monkeypatch.chdir(tmp_path)
    for folder in ("ckpt", "Wan2.1-T2V-1.3B"):  # the checkpoint folders the commands below name
        checkpoint_layout(folder, up.configs.WAN_CONFIGS["i2v-14B"])
    for name in ("wan_i2v_2.png", "wan_i2v.png", "i2v_input.JPG", "grogu.png"):
        os.makedirs("examples", exist_ok=True)
        make_image(os.path.join("examples", name))

    class Script:
        def __init__(self):
            self.made, self.counters, self.dir = made, counters, tmp_path

        def __call__(self, method, argv):
            return main(method, argv, upstream=g)

    return Script()


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_published_command_parses(up, script, key):
    method, index = key
    argv = command_argv(COMMANDS[method][index])
    ours, rest = split_argv(method, argv)
    args = upstream_args(up.generate, f"{method}_generate.py", rest)
    plan = make_plan(method, ours, args, up.generate)
    want_method, want_profile, want_params = EXPECTED[key]
    assert plan.method == want_method
    assert (plan.profile.name if plan.profile else None) == want_profile
    assert plan.params == want_params
    assert plan.calibrate == (key == ("magcache", 3))
    assert not any("resampled" in n for n in plan.notes)  # every published command runs at its table's steps
    assert script.made == []  # nothing loaded


def test_published_magcache_schedule_runs_42_of_100(script):
    argv = command_argv(MAGCACHE_COMMANDS[0])
    argv[argv.index("--size") + 1] = TINY_SIZE
    argv += ["--frame_num", "5", "--save_file", "out/cats.mp4"]
    assert script("magcache", argv) == 0
    stats = json.load(open(script.dir / "out" / "cats.stats.json"))
    assert stats["pattern"] == PUBLISHED_42
    assert (stats["computed_passes"], stats["total_passes"]) == (42, 100)
    assert stats["branches"] == {"cond": {"computed": 21, "total": 50}, "uncond": {"computed": 21, "total": 50}}
    assert script.counters[0].passes == 42  # block work, counted inside the blocks
    assert stats["dit_calls"] == 100 and stats["dit_seconds"] > 0
    assert stats["profile"] == "wan2.1-t2v-1.3b" and stats["video"] == "out/cats.mp4"


@pytest.mark.parametrize("method, argv, message", [
    ("easycache", ["--task", "t2v-1.3B", "--cache_profile", "wan2.1-i2v-14b-480p"],
     "measured on a Wan2.1 I2V model, but --task t2v-1.3B runs T2V"),
    ("magcache", ["--task", "i2v-14B", "--use_magcache"], "--task i2v-14B needs --image PATH"),
    ("teacache", ["--task", "i2v-14B", "--image", "missing.png"], "--image 'missing.png' does not exist"),
    ("magcache", ["--task", "t2v-1.3B", "--use_magcache", "--magcache_calibration"], "exclude each other"),
    ("magcache", ["--task", "t2v-1.3B", "--cache_profile", "wan2.1-t2v-1.3b"], "add --use_magcache"),
    ("magcache", ["--task", "t2v-1.3B", "--use_magcache", "--magcache_K", "0"], "magcache K=0"),
    ("teacache", ["--task", "t2v-1.3B", "--teacache_thresh", "-1"], "teacache thresh=-1.0"),
    ("easycache", ["--task", "t2v-1.3B", "--alpha", "0.5"], "--alpha is parsed but never used"),
    ("easycache", ["--task", "t2v-1.3B", "--ret_steps", "50"], "--ret_steps 50 covers all 50 sampling steps"),
    ("magcache", ["--task", "flf2v-14B", "--use_magcache", "--first_frame", "examples/grogu.png",
                  "--last_frame", "examples/grogu.png"], "no published magcache table for --task flf2v-14B"),
    ("teacache", ["--task", "t2v-1.3B", "--cache_profile", "no-such-profile"], "unknown profile 'no-such-profile'"),
])
def test_wrong_combinations_fail_before_loading(script, capsys, method, argv, message):
    assert script(method, argv + ["--size", TINY_SIZE, "--ckpt_dir", "./ckpt"]) == 2
    assert message in capsys.readouterr().err
    assert script.made == []


def test_magcache_table_for_40_steps_at_50_is_resampled_with_a_note(script, capsys):
    argv = ["--task", "i2v-14B", "--size", TINY_SIZE, "--ckpt_dir", "./ckpt", "--image", "examples/wan_i2v.png",
            "--use_magcache", "--magcache_K", "6", "--magcache_thresh", "0.24", "--sample_steps", "50",
            "--frame_num", "5", "--save_file", "out/i2v.mp4"]
    assert script("magcache", argv) == 0
    assert "MagCache table has 40 steps; this run has 50: resampled" in capsys.readouterr().out
    stats = json.load(open(script.dir / "out" / "i2v.stats.json"))
    assert stats["total_passes"] == 100 and stats["computed_passes"] == script.counters[0].passes < 100


@pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning")
def test_calibration_writes_a_profile_that_a_second_run_loads(up, script, capsys, monkeypatch):
    # The calibrated file names the model it measured (the tiny one); make --task describe that model too.
    tiny_cfg = copy.deepcopy(up.configs.WAN_CONFIGS["t2v-1.3B"])
    tiny_cfg.num_layers, tiny_cfg.num_heads = 3, 2
    monkeypatch.setitem(up.generate.WAN_CONFIGS, "t2v-1.3B", tiny_cfg)
    common = ["--task", "t2v-1.3B", "--size", TINY_SIZE, "--ckpt_dir", "./ckpt", "--frame_num", "5",
              "--sample_steps", "12", "--base_seed", "3"]
    assert script("magcache", common + ["--magcache_calibration", "--calibration_file", "cal/t2v.json",
                                        "--save_file", "out/cal.mp4"]) == 0
    profile = load_profile(str(script.dir / "cal" / "t2v.json"))
    table = profile.method("magcache")
    assert table["steps"] == 12 and table["branches"] == ["cond", "uncond"] and len(table["ratios"]) == 24
    assert table["ratios"][:2] == [1.0, 1.0] and profile.data["model"]["config"]["num_layers"] == 3
    assert table["source"].startswith("calibrated by stepcache")
    assert profile.has("teacache") and profile.has("easycache")  # copied from the shipped T2V-1.3B profile

    # The ratios are what the residuals of an uncached run of the same model give, measured here independently.
    sampler = bare_sampler(up, "t2v", tiny_model(up, "t2v"))
    residuals = {0: [], 1: []}
    calls = []
    first, last = sampler.model.blocks[0], sampler.model.blocks[-1]
    first.register_forward_pre_hook(lambda m, a: calls.append(a[0]))
    last.register_forward_hook(lambda m, a, out: residuals[(len(calls) - 1) % 2].append(out - calls[-1]))
    sampler.generate("Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
                     "spotlighted stage.", size=(64, 64), frame_num=5, shift=5.0, sampling_steps=12, seed=3,
                     offload_model=False)
    for branch in (0, 1):
        r = residuals[branch]
        expected = [(r[i].norm(dim=-1) / r[i - 1].norm(dim=-1)).mean().item() for i in range(1, 12)]
        assert table["ratios"][2 + branch::2] == pytest.approx(expected, abs=1e-5)
    assert len(set(table["ratios"][2:])) > 1

    capsys.readouterr()
    assert script("magcache", common + ["--use_magcache", "--cache_profile", "cal/t2v.json", "--magcache_K", "4",
                                        "--magcache_thresh", "0.3", "--save_file", "out/use.mp4"]) == 0
    stats = json.load(open(script.dir / "out" / "use.stats.json"))
    assert stats["profile"] == profile.name and stats["profile_file"].endswith("t2v.json")
    from stepcache.methods import resolve_method
    from stepcache.schedule import simulate
    expected = simulate(resolve_method("magcache", profile, thresh=0.3, K=4, retention_ratio=0.2), 12)
    assert stats["pattern"] == expected.pattern() and "." in stats["pattern"]
    # Every entry point takes the file: TeaCache from its copied table.
    assert script("teacache", common + ["--cache_profile", "cal/t2v.json", "--save_file", "out/tea.mp4"]) == 0


# ---------------------------------------------------------------------------- failed runs and missing inputs
TINY_T2V = ["--task", "t2v-1.3B", "--size", TINY_SIZE, "--ckpt_dir", "./ckpt", "--frame_num", "5", "--sample_steps",
            "8"]


def test_a_video_upstream_could_not_write_fails_without_stats(up, script, capsys, monkeypatch):
    """Upstream's own cache_video failing inside its try (no torchvision here, or its writer finds no room):
    upstream prints the error and returns None. The script exits 1 with one line, and leaves neither a video nor
    a stats file naming one."""
    import sys
    utils = sys.modules["wan.utils.utils"]

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(up.generate, "cache_video", utils.cache_video)
    monkeypatch.setattr(utils.imageio, "get_writer", no_room)
    assert script("teacache", TINY_T2V + ["--save_file", "out/v.mp4"]) == 1
    out, err = capsys.readouterr()
    assert "cache_video failed, error:" in out  # upstream's own message
    lines = [line for line in err.splitlines() if "it/s]" not in line and line.strip()]  # not tqdm's bar
    assert lines == ["teacache_generate.py: error: upstream's cache_video did not write 'out/v.mp4' (its message is "
                     "above); no video and no stats were written"]
    assert not os.path.exists("out") or os.listdir("out") == []
    assert script.counters[0].passes > 0  # the generation itself ran


def test_seed_command_without_weights_stops_before_upstream_builds_anything(script, capsys):
    """The published command run verbatim where its --ckpt_dir was never downloaded: one line, exit 2, and no
    sampler constructed (upstream would build umt5-xxl first)."""
    argv = command_argv(TEACACHE_COMMANDS[1])
    assert script("teacache", argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "teacache_generate.py: error: --ckpt_dir './Wan2.1-T2V-14B' does not exist; give the folder of the "
        "downloaded --task t2v-14B checkpoint"]
    assert script.made == []
    os.remove("ckpt/Wan2.1_VAE.pth")
    assert script("teacache", TINY_T2V) == 2
    assert "--ckpt_dir './ckpt' has no Wan2.1_VAE.pth (the VAE checkpoint upstream loads for --task t2v-1.3B)" in \
        capsys.readouterr().err
    assert script.made == []


def test_bad_output_path_fails_before_loading(script, capsys):
    open("taken", "w").close()
    assert script("teacache", TINY_T2V + ["--save_file", "taken/v.mp4"]) == 2
    assert "--save_file 'taken/v.mp4': 'taken' is a file, not a folder" in capsys.readouterr().err
    assert script("magcache", TINY_T2V + ["--magcache_calibration", "--save_file", "v.mp4", "--calibration_file",
                                          "taken/c.json"]) == 2
    assert "--calibration_file 'taken/c.json'" in capsys.readouterr().err
    assert script.made == []


def test_copied_script_without_easydict_names_what_to_install(tmp_path):
    """The script copied into a checkout (here: a folder with links to upstream's generate.py and wan/), run
    where easydict cannot be imported."""
    import subprocess
    import sys
    from pathlib import Path

    import stepcache.wan21
    for name in ("generate.py", "wan"):
        (tmp_path / name).symlink_to(Path(REPO) / name)
    script_file = Path(stepcache.wan21.__file__).with_name("magcache_generate.py")
    (tmp_path / "magcache_generate.py").write_text(script_file.read_text())
    code = ("import runpy, sys; sys.modules['easydict'] = None; sys.argv = ['magcache_generate.py', '--task', "
            "'t2v-1.3B']; runpy.run_path('magcache_generate.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "magcache_generate.py: error: upstream Wan2.1 needs the Python module 'easydict', which is not installed: "
        "pip install easydict (or pip install -r requirements.txt in the Wan2.1 checkout)")
    assert "Traceback" not in result.stderr
