"""The drop-in scripts for the official Wan2.2 repo, on upstream's own code (``WAN22_REPO``) with tiny WanModels.

Upstream's ``WanT2V`` / ``WanI2V`` (two experts, switched at ``boundary``) and ``WanTI2V`` sampling loops and its
``generate.py`` (parser, checks, saving) run unchanged; only checkpoint loading, flash-attention, torchvision and
``torch.cuda.synchronize`` stand in (see wan22_official_tiny.py). Mirrors test_wan_official.py (Wan2.1).
"""
import copy
import json
import os
import shlex

import pytest
import torch

from helpers import BlockWork, wan22_checkout
from wan22_official_tiny import (TINY_SIZE, bare_sampler, cuda_sync_noop, expert_trace, fake_constructors,
                                 high_noise_steps, make_image, run_i2v, run_t2v, run_ti2v, save_video_with_torch,
                                 tiny_sizes, up)  # noqa: F401  (up: the fixture of upstream on the CPU)

REPO = str(wan22_checkout())
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning"),
              # the tiny models are not the 14B / 5B ones the profiles were measured on
              pytest.mark.filterwarnings("ignore::stepcache.profiles.ProfileFitWarning"),
              pytest.mark.filterwarnings("ignore:stepcache. the checkpoint in --ckpt_dir is not the model profile")]
torch.set_num_threads(1)  # as conftest.py: bit-identical reruns

from stepcache.methods import EXPERT_MARK, resolve_method  # noqa: E402
from stepcache.profiles import load_profile  # noqa: E402
from stepcache.runner import NothingCachedWarning  # noqa: E402
from stepcache.schedule import simulate  # noqa: E402
from stepcache.wan21.official_generate import PlanError, main, make_plan, split_argv, upstream_args  # noqa: E402
from stepcache.wan22.official import attach  # noqa: E402
from stepcache.wan22.official_generate import WAN22  # noqa: E402
from test_wan22_profiles import PUBLISHED  # noqa: E402  (the published MagCache4Wan2.2 schedules)

STEPS = 8
# kind -> the shipped profile attach() gets (ti2v+image: TI2V-5B with --image).
PROFILES = {"t2v": "wan2.2-t2v-a14b", "i2v": "wan2.2-i2v-a14b", "ti2v": "wan2.2-ti2v-5b",
            "ti2v+image": "wan2.2-ti2v-5b-i2v"}
A14B = ("t2v", "i2v")
KINDS = ("t2v", "i2v", "ti2v", "ti2v+image")
# Settings under which each method reuses passes of both experts on the tiny random models at 12 steps. Their
# random time embedding changes far more per step than a trained one, so TeaCache needs a far larger budget.
REUSING = {"magcache": dict(thresh=0.24, K=4, retention_ratio=0.2), "teacache": dict(thresh=500.0),
           "easycache": dict(thresh=0.3, warmup_steps=2)}

# The published commands, verbatim (MagCache4Wan2.2/README.md, its four; EasyCache4Wan2.2/README.md, its three).
MAGCACHE_COMMANDS = [
    """python magcache_generate.py \\
    --task ti2v-5B --size 1280*704 \\
    --ckpt_dir ./Wan-AI/Wan2.2-TI2V-5B \\
    --offload_model True --convert_model_dtype \\
    --t5_cpu \\
    --base_seed 42 \\
    --use_magcache \\
    --magcache_thresh 0.06 \\
    --magcache_K 2 \\
    --prompt "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage\"""",  # noqa: E501
    """python magcache_generate.py --task ti2v-5B --size 1280*704 \\
    --ckpt_dir ./Wan2.2-TI2V-5B --offload_model True \\
    --use_magcache \\
    --magcache_thresh 0.06 \\
    --base_seed 42 \\
    --convert_model_dtype --t5_cpu --image examples/i2v_input.JPG \\
    --prompt "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside.\"""",  # noqa: E501
    """python magcache_generate.py  --task t2v-A14B \\
    --size 832*480 --ckpt_dir /data/mzh/pretrained_weights/Wan-AI/Wan2.2-T2V-A14B \\
    --t5_cpu \\
    --use_magcache \\
    --magcache_thresh 0.06 \\
    --retention_ratio 0.4 \\
    --offload_model True --convert_model_dtype \\
    --base_seed 42 \\
    --prompt "A man is talking to a woman in the office room.\"""",
    """python magcache_generate.py --task i2v-A14B \\
    --size 832*480 \\
    --ckpt_dir /data/mzh/pretrained_weights/Wan-AI/Wan2.2-I2V-A14B \\
    --image examples/wan_i2v_2.png \\
    --offload_model True --convert_model_dtype \\
    --use_magcache \\
    --magcache_thresh 0.06 \\
    --magcache_K 2 \\
    --retention_ratio 0.1 \\
    --t5_cpu \\
    --base_seed 42 \\
    --prompt "A woman in black lace stands confidently in a dim Art Deco interior with polished marble floors. Stark chiaroscuro lighting highlights her sharp features as she tilts her head, crimson lips parting in a knowing smile. Her smoldering gaze meets the viewer while she turns gracefully, lace casting shifting shadows on the walls. A medium shot with a subtle dolly zoom, framed by velvet drapes, adds depth. The mysterious, refined atmosphere blends modern elegance with vintage Hollywood glamour, rendered in 8K hyper-realistic detail, metallic gold accents glowing in the soft light.\"""",  # noqa: E501
]
EASYCACHE_COMMANDS = [
    """python easycache_generate.py \\
  --task t2v-A14B \\
  --size "1280*720" \\
  --ckpt_dir ./Wan2.2-T2V-A14B \\
  --offload_model True \\
  --convert_model_dtype \\
  --prompt "The camera follows behind a white vintage SUV with a black roof rack as it speeds up a steep dirt road surrounded by pine trees on a steep mountain slope, dust kicks up from it’s tires, the sunlight shines on the SUV as it speeds along the dirt road, casting a warm glow over the scene. The dirt road curves gently into the distance, with no other cars or vehicles in sight. The trees on either side of the road are redwoods, with patches of greenery scattered throughout. The car is seen from the rear following the curve with ease, making it seem as if it is on a rugged drive through the rugged terrain. The dirt road itself is surrounded by steep hills and mountains, with a clear blue sky above with wispy clouds." \\
  --base_seed 42""",  # noqa: E501
    """python easycache_generate.py \\
  --task ti2v-5B \\
  --size "1280*704" \\
  --ckpt_dir ./Wan2.2-TI2V-5B \\
  --prompt "A campfire burns in a sunlit forest clearing, with bright sparks occasionally leaping out." \\
  --base_seed 42""",
    """python easycache_generate.py \\
  --task ti2v-5B \\
  --size "1280*704" \\
  --ckpt_dir ./Wan2.2-TI2V-5B \\
  --image examples/i2v_input.JPG \\
  --prompt "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside." \\
  --base_seed 42""",  # noqa: E501
]
# (script, command index) -> (method, profile, params) the plan must hold: the README's values, else the published
# scripts' defaults (MagCache4Wan2.2: --magcache_K 2, --retention_ratio 0.2, --magcache_thresh 0.04; EasyCache4Wan2.2:
# --thresh 0.05 for TI2V-5B, --thresh_t2v 0.06 for T2V-A14B, --ret_steps 7).
EXPECTED = {
    ("magcache", 0): ("magcache", "wan2.2-ti2v-5b", {"thresh": 0.06, "K": 2, "retention_ratio": 0.2}),
    ("magcache", 1): ("magcache", "wan2.2-ti2v-5b-i2v", {"thresh": 0.06, "K": 2, "retention_ratio": 0.2}),
    ("magcache", 2): ("magcache", "wan2.2-t2v-a14b", {"thresh": 0.06, "K": 2, "retention_ratio": 0.4}),
    ("magcache", 3): ("magcache", "wan2.2-i2v-a14b", {"thresh": 0.06, "K": 2, "retention_ratio": 0.1}),
    ("easycache", 0): ("easycache", "wan2.2-t2v-a14b", {"thresh": 0.06, "warmup_steps": 7}),
    ("easycache", 1): ("easycache", "wan2.2-ti2v-5b", {"thresh": 0.05, "warmup_steps": 7}),
    ("easycache", 2): ("easycache", "wan2.2-ti2v-5b-i2v", {"thresh": 0.05, "warmup_steps": 7}),
}
COMMANDS = {"magcache": MAGCACHE_COMMANDS, "easycache": EASYCACHE_COMMANDS}
# MAGCACHE_COMMANDS[i] is the README command of the published schedule PUBLISHED[i] (test_wan22_profiles).
assert [EXPECTED[("magcache", i)][1] for i in range(len(MAGCACHE_COMMANDS))] == [row[0] for row in PUBLISHED]


def command_argv(command: str) -> list[str]:
    return shlex.split(command.replace("\\\n", " "))[2:]  # the shell joins continued lines; drop "python x.py"


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def replaced(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def checkpoint_layout(folder, config, experts: bool = True) -> str:
    """The files and folders a downloaded Wan2.2 checkpoint for ``config`` (upstream's WAN_CONFIGS entry) has, as
    empty placeholders: T5, its tokenizer folder, the VAE and each DiT folder (A14B: ``low_noise_model/`` and
    ``high_noise_model/``, TI2V: the root) with config.json and weights. ``experts=False`` leaves out
    ``high_noise_model/``."""
    os.makedirs(os.path.join(folder, config.t5_tokenizer), exist_ok=True)
    dits = [""]
    if "low_noise_checkpoint" in config:
        dits = [config.low_noise_checkpoint] + ([config.high_noise_checkpoint] if experts else [])
    files = [config.t5_checkpoint, config.vae_checkpoint]
    for dit in dits:
        files += [os.path.join(dit, "config.json"), os.path.join(dit, "diffusion_pytorch_model.safetensors")]
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb"):
            pass
    return str(folder)


def with_tables(tmp_path, kind: str) -> str:
    """The shipped Wan2.2 profile of ``kind`` with Wan2.1-14B's TeaCache polynomial (none is published for Wan2.2)
    and, where it has none (I2V-A14B: EasyCache4Wan2.2 runs it uncached), T2V-A14B's EasyCache setting."""
    data = json.loads(load_profile(PROFILES[kind]).path.read_text())
    data["name"] = f"{data['name']}-test-tables"
    data["teacache"] = load_profile("wan2.1-t2v-14b").method("teacache")
    data.setdefault("easycache", load_profile("wan2.2-t2v-a14b").method("easycache"))
    path = tmp_path / f"{data['name']}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("img") / "first.png")


@pytest.fixture(scope="module")
def test_profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    return {kind: with_tables(folder, kind) for kind in KINDS}


def sampler_of(up, kind):
    return bare_sampler(up, "ti2v" if kind.startswith("ti2v") else kind)


def run(kind, sampler, image, steps=STEPS):
    if kind == "t2v":
        return run_t2v(sampler, steps=steps)
    if kind == "i2v":
        return run_i2v(sampler, image, steps=steps)
    return run_ti2v(sampler, image if kind == "ti2v+image" else None, steps=steps)


def models_of(sampler):
    """The sampler's WanModels in run order."""
    if hasattr(sampler, "high_noise_model"):
        return [sampler.high_noise_model, sampler.low_noise_model]
    return [sampler.model]


@pytest.fixture(scope="module")
def baselines(up, image):
    return {kind: run(kind, sampler_of(up, kind), image) for kind in KINDS}


def assert_removed(sampler):
    assert "generate" not in sampler.__dict__
    for model in models_of(sampler):
        assert "forward" not in model.__dict__ and all("forward" not in b.__dict__ for b in model.blocks)
        assert not model._forward_hooks and not model._forward_pre_hooks


# Every method on every task; the A14B samplers under both expert rules (TI2V-5B has one model).
ZERO = [(kind, method, experts) for kind in KINDS for method in ("magcache", "teacache", "easycache")
        for experts in (("shared", "separate") if kind in A14B else (None,))]


@pytest.mark.parametrize("kind, method, experts", ZERO, ids=["-".join(filter(None, z)) for z in ZERO])
def test_threshold_zero_is_bit_identical_to_upstream(up, image, baselines, test_profiles, kind, method, experts):
    sampler = sampler_of(up, kind)
    works = [BlockWork(m) for m in models_of(sampler)]
    profile = PROFILES[kind] if method == "magcache" else test_profiles[kind]
    params = {**REUSING[method], "thresh": 0.0, **({"experts": experts} if experts else {})}
    attachment = attach(sampler, method, profile, params)
    with pytest.warns(NothingCachedWarning, match="a threshold of 0 disables reuse"):
        out = run(kind, sampler, image)
    assert torch.equal(out, baselines[kind])
    assert attachment.cached.stats.counts() == (2 * STEPS, 2 * STEPS)
    assert sum(w.passes for w in works) == 2 * STEPS  # every pass ran every block, on whichever expert
    experts_seen = attachment.cached.stats.experts()
    if kind in A14B:
        switch = high_noise_steps(up, sampler, STEPS)
        assert list(experts_seen) == ["high", "low"] and experts_seen["low"]["first_step"] == switch
        assert [w.passes for w in works] == [2 * switch, 2 * (STEPS - switch)]
    else:
        assert experts_seen == {}
    for work in works:
        work.remove()
    attachment.remove()
    assert_removed(sampler)
    assert torch.equal(run(kind, sampler, image), baselines[kind])


REUSED_STEPS = 12
REUSE = [(kind, method, experts) for kind in A14B for method in ("magcache", "teacache", "easycache")
         for experts in ("shared", "separate")]


@pytest.mark.parametrize("kind, method, experts", REUSE, ids=["-".join(r) for r in REUSE])
def test_a_reused_pass_runs_no_block_of_either_expert(up, image, test_profiles, kind, method, experts):
    sampler = sampler_of(up, kind)
    baseline = run(kind, sampler, image, steps=REUSED_STEPS)
    works = [BlockWork(m) for m in models_of(sampler)]
    attachment = attach(sampler, method, test_profiles[kind], {**REUSING[method], "experts": experts})
    with expert_trace(sampler) as trace:
        cached = run(kind, sampler, image, steps=REUSED_STEPS)
    switch = high_noise_steps(up, sampler, REUSED_STEPS)
    assert 0 < switch < REUSED_STEPS
    assert "".join(trace) == "HH" * switch + "LL" * (REUSED_STEPS - switch)  # upstream's own switch
    assert attachment.generations[-1].switch_step == switch
    stats = attachment.cached.stats
    experts_seen = stats.experts()
    assert list(experts_seen) == ["high", "low"]
    assert (experts_seen["high"]["first_step"], experts_seen["low"]["first_step"]) == (0, switch)
    assert (experts_seen["high"]["total"], experts_seen["low"]["total"]) == (2 * switch, 2 * (REUSED_STEPS - switch))
    records = stats.of()
    assert [r.expert for r in records] == ["high"] * 2 * switch + ["low"] * 2 * (REUSED_STEPS - switch)
    reusing = {r.expert for r in records if not r.computed}
    if (kind, method, experts) == ("i2v", "magcache", "shared"):
        # MagCache4Wan2.2's I2V rule retains every pass of the high-noise expert.
        assert reusing == {"low"}
        assert {r.reason for r in records if r.expert == "high"} == {"retention"}
    else:
        assert reusing == {"high", "low"}, "precondition: both experts reuse"
    per_call = works[0].block + works[1].block  # the high expert's passes come first
    assert len(per_call) == len(records) == 2 * REUSED_STEPS
    for record, linear_calls in zip(records, per_call):  # counted inside the blocks, not by the cache
        assert linear_calls == (works[0].per_pass if record.computed else 0), record
    assert torch.isfinite(cached).all() and not torch.equal(cached, baseline)
    record = attachment.generations[-1]
    assert record.dit_calls == 2 * REUSED_STEPS and record.pixel_size == (64, 64)
    for work in works:
        work.remove()
    attachment.remove()
    assert_removed(sampler)
    assert torch.equal(run(kind, sampler, image, steps=REUSED_STEPS), baseline)


def test_easycache_reused_pass_returns_latent_plus_the_cached_transformation_across_the_switch(up, image,
                                                                                               test_profiles):
    """A reused pass returns ``x + (v - x)`` of its branch's last computed pass, as upstream's list of latents;
    with the published shared state the low expert's first pass can reuse the high expert's transformation."""
    sampler = sampler_of(up, "t2v")
    attachment = attach(sampler, "easycache", test_profiles["t2v"], REUSING["easycache"])
    seen = []
    for model in models_of(sampler):
        model.register_forward_hook(lambda m, a, k, out: seen.append((m, a[0][0], out)), with_kwargs=True)
    run("t2v", sampler, image)
    records = attachment.cached.stats.of()
    assert len(seen) == len(records) == 2 * STEPS
    last, reused, crossed = {}, 0, False
    for (model, x, out), record in zip(seen, records):
        assert model is models_of(sampler)[record.expert == "low"]
        assert isinstance(out, list) and len(out) == 1 and out[0].shape == x.shape == (16, 2, 8, 8)
        if record.computed:
            last[record.branch] = (out[0] - x, record.expert)
        else:
            reused += 1
            crossed |= last[record.branch][1] != record.expert
            assert torch.equal(out[0], (x + last[record.branch][0]).float())
    assert reused > 0 and crossed


# experts="separate": the low expert's first passes warm up as at the start of a run (method by method: its cond
# and uncond passes of its first steps; EasyCache decides on cond and its uncond pass follows).
LOW_WARMUP = {"magcache": (dict(thresh=0.24, K=4, retention_ratio=0.5), ["warmup"] * 4),
              "teacache": (REUSING["teacache"], ["warmup"] * 2),
              "easycache": (REUSING["easycache"], ["warmup", "follow"] * 2)}


@pytest.mark.parametrize("method", sorted(LOW_WARMUP))
def test_separate_experts_warm_up_again_and_release_the_first_experts_state(up, image, test_profiles, method):
    sampler = sampler_of(up, "t2v")
    params, warmup = LOW_WARMUP[method]
    attachment = attach(sampler, method, test_profiles["t2v"], {**params, "experts": "separate"})
    runner = attachment.cached.runner
    seen = []
    original = runner.begin_pass

    def spy(branch, step, *args, **kwargs):
        ctx = original(branch, step, *args, **kwargs)
        seen.append((step, ctx.branch, sorted(runner.branches)))
        return ctx

    runner.begin_pass = spy
    run("t2v", sampler, image, steps=REUSED_STEPS)
    switch = high_noise_steps(up, sampler, REUSED_STEPS)
    assert len(seen) == 2 * REUSED_STEPS
    for step, key, keys in seen:
        expert = "high" if step < switch else "low"
        assert key.endswith(EXPERT_MARK + expert)
        assert all(k.endswith(EXPERT_MARK + expert) for k in keys), (step, keys)  # the other expert's: gone
    assert sorted(seen[2 * switch][2]) == [f"cond{EXPERT_MARK}low"]  # released as the low expert starts
    records = attachment.cached.stats.of()
    low = [r for r in records if r.expert == "low"]
    assert [r.reason for r in low[:len(warmup) + 1]] == warmup + [low[len(warmup)].reason]
    assert low[len(warmup)].reason not in warmup and all(r.computed for r in low[:len(warmup)])
    assert low[0].step == switch and records[0].reason == "warmup"  # as the high expert's first pass
    # The published rule (shared) carries one state over the switch: plain branch keys, no warm-up at the switch.
    shared = attach(sampler_of(up, "t2v"), method, test_profiles["t2v"], params)
    keys = []
    begin = shared.cached.runner.begin_pass
    shared.cached.runner.begin_pass = lambda *a, **k: keys.append(begin(*a, **k).branch) or shared.cached.runner.current
    run("t2v", shared.sampler, image, steps=REUSED_STEPS)
    assert keys == ["cond", "uncond"] * REUSED_STEPS
    assert "warmup" not in [r.reason for r in shared.cached.stats.of() if r.expert == "low"][:len(warmup)]


# ------------------------------------------------------------------------------------------- the scripts
@pytest.fixture
def script(up, monkeypatch, tmp_path):
    """Upstream's generate.py as the scripts see it: the tiny samplers behind ``wan.WanT2V`` / ``WanI2V`` /
    ``WanTI2V`` (each expert counted by a BlockWork), 64*64 in its size tables, videos saved with torch.save,
    torch.cuda.synchronize a no-op, and the checkpoint folders and images the published commands name."""
    g = up.generate
    monkeypatch.setattr(g, "save_video", save_video_with_torch)
    made, counters = [], []

    def count(model):
        counters.append(BlockWork(model))
        return model

    for name, build in fake_constructors(up, made, wrap=count).items():
        monkeypatch.setattr(up.wan, name, build, raising=False)
    monkeypatch.chdir(tmp_path)
    configs = up.configs.WAN_CONFIGS
    for folder, task in (("ckpt-t2v", "t2v-A14B"), ("ckpt-i2v", "i2v-A14B"), ("ckpt-ti2v", "ti2v-5B"),
                         ("Wan-AI/Wan2.2-TI2V-5B", "ti2v-5B"), ("Wan2.2-TI2V-5B", "ti2v-5B"),
                         ("Wan2.2-T2V-A14B", "t2v-A14B"),  # the READMEs' relative --ckpt_dir folders
                         ("data/mzh/pretrained_weights/Wan-AI/Wan2.2-T2V-A14B", "t2v-A14B"),
                         ("data/mzh/pretrained_weights/Wan-AI/Wan2.2-I2V-A14B", "i2v-A14B")):
        checkpoint_layout(folder, configs[task])
    os.makedirs("examples")
    for name in ("i2v_input.JPG", "wan_i2v_2.png"):
        make_image(os.path.join("examples", name))

    class Script:
        def __init__(self):
            self.made, self.counters, self.dir = made, counters, tmp_path

        def __call__(self, method, argv):
            return main(method, argv, upstream=g, repo=WAN22)

    with tiny_sizes(up), cuda_sync_noop():
        yield Script()


def plan_of(up, method, argv):
    ours, rest = split_argv(method, argv, WAN22)
    args = upstream_args(up.generate, f"{method}_generate.py", rest)
    return make_plan(method, ours, args, up.generate, WAN22), args


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=[f"{m}-{i}" for m, i in sorted(EXPECTED)])
def test_published_command_parses(up, script, key):
    method, index = key
    plan, args = plan_of(up, method, command_argv(COMMANDS[method][index]))
    want_method, want_profile, want_params = EXPECTED[key]
    assert plan.method == want_method
    assert plan.profile.name == want_profile
    assert plan.params == want_params
    assert not plan.calibrate
    assert not any("resampled" in n for n in plan.notes)  # every published command runs at its table's steps
    assert args.sample_steps == load_profile(want_profile).method("magcache")["steps"]  # 50 TI2V-5B, 40 A14B
    assert script.made == []  # nothing loaded


@pytest.mark.parametrize("image, profile", [(False, "wan2.2-ti2v-5b"), (True, "wan2.2-ti2v-5b-i2v")])
def test_a_ti2v_profile_is_taken_for_its_own_run_and_refused_for_the_other(up, script, image, profile):
    """TI2V-5B's tables are for text-to-video and for image-to-video (--image): each is accepted for its run by
    name (the path a calibrated file takes too) and refused for the other one."""
    argv = ["--task", "ti2v-5B", "--size", "1280*704", "--ckpt_dir", "ckpt-ti2v", "--use_magcache", "--cache_profile",
            profile]
    if image:
        argv += ["--image", "examples/i2v_input.JPG"]
    plan, _ = plan_of(up, "magcache", argv)
    assert plan.profile.name == profile
    other = "wan2.2-ti2v-5b" if image else "wan2.2-ti2v-5b-i2v"
    with pytest.raises(PlanError, match=f"measured on a Wan2.2 {'T2V' if image else 'I2V'} model"):
        plan_of(up, "magcache", replaced(argv, "--cache_profile", other))


@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B"])
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_calibrated_expert_data_give_the_switch_upstreams_scheduler_makes(up, task, solver):
    """A calibrated A14B table states its expert data; at every step count up to 100, with either solver, they give
    the step at which upstream's own scheduler hands over (so the plan's check before loading never refuses a
    default run)."""
    from types import SimpleNamespace

    from stepcache.wan22.official import switch_step_for
    cfg = up.configs.WAN_CONFIGS[task]
    sampler = up.WanT2V if task.startswith("t2v") else up.WanI2V
    for steps in range(2, 101):
        args = SimpleNamespace(task=task, sample_steps=steps, sample_shift=cfg.sample_shift, sample_solver=solver)
        assert WAN22.experts_of_run(args)["switch_step"] == switch_step_for(
            sampler, cfg.num_train_timesteps, cfg.boundary, steps, cfg.sample_shift, solver), steps


def test_script_defaults_are_the_published_scripts():
    ours, rest = split_argv("magcache", ["--task", "t2v-A14B", "--use_magcache"], WAN22)
    assert (ours.magcache_thresh, ours.magcache_K, ours.retention_ratio) == (0.04, 2, 0.2) and rest == [
        "--task", "t2v-A14B"]
    ours, _ = split_argv("easycache", ["--task", "t2v-A14B"], WAN22)
    assert (ours.thresh, ours.thresh_t2v, ours.ret_steps) == (0.05, 0.06, 7)


@pytest.mark.parametrize("index", range(len(MAGCACHE_COMMANDS)), ids=[row[0] for row in PUBLISHED])
def test_published_magcache_command_runs_the_published_schedule(script, index):
    profile, steps, thresh, K, retention, mode, expert, computed, total, pattern = PUBLISHED[index]
    argv = replaced(command_argv(MAGCACHE_COMMANDS[index]), "--size", TINY_SIZE)
    ckpt = argv[argv.index("--ckpt_dir") + 1]
    if os.path.isabs(ckpt):  # the README's own machine; the same folders under the test's folder
        argv = replaced(argv, "--ckpt_dir", ckpt.lstrip("/"))
    argv += ["--frame_num", "5", "--save_file", "out/x.mp4"]
    with pytest.warns(UserWarning, match=f"the checkpoint in --ckpt_dir is not the model profile {profile} was "
                                         f"measured on: num_layers=3"):
        assert script("magcache", argv) == 0
    assert os.path.getsize("out/x.mp4") > 0
    stats = read_json(script.dir / "out" / "x.stats.json")
    assert stats["profile"] == profile and stats["params"] == EXPECTED[("magcache", index)][2]
    assert stats["pattern"] == pattern and "|" not in stats["pattern"]
    assert (stats["computed_passes"], stats["total_passes"]) == (computed, total) == (pattern.count("C"), 2 * steps)
    assert stats["dit_calls"] == total and stats["sample_steps"] == steps
    # Block work, counted inside the blocks of each expert in run order: exactly the computed passes.
    assert len(script.made) == 1
    assert "".join(work.ran() for work in script.counters) == pattern
    if expert is None:
        assert stats["experts"] == {} and len(script.counters) == 1
    else:
        switch = load_profile(profile).expert_switch_step(steps)
        high, low = pattern[:2 * switch], pattern[2 * switch:]
        assert stats["experts"] == {
            "high": {"computed": high.count("C"), "total": len(high), "first_step": 0},
            "low": {"computed": low.count("C"), "total": len(low), "first_step": switch}}
        assert [len(work.block) for work in script.counters] == [len(high), len(low)]


def test_cache_experts_separate_on_the_published_t2v_command(script):
    """--cache_experts separate (stepcache's): the README's T2V-A14B command keeps a state per expert, each
    computing the first retention_ratio of its own passes, as `stepcache schedule` simulates it."""
    argv = replaced(command_argv(MAGCACHE_COMMANDS[2]), "--size", TINY_SIZE)
    argv = replaced(argv, "--ckpt_dir", argv[argv.index("--ckpt_dir") + 1].lstrip("/"))
    assert script("magcache", argv + ["--frame_num", "5", "--save_file", "out/x.mp4", "--cache_experts",
                                      "separate"]) == 0
    stats = read_json(script.dir / "out" / "x.stats.json")
    assert stats["params"] == {"thresh": 0.06, "K": 2, "retention_ratio": 0.4, "experts": "separate"}
    config = resolve_method("magcache", "wan2.2-t2v-a14b", thresh=0.06, K=2, retention_ratio=0.4, experts="separate")
    assert stats["pattern"] == simulate(config, 40).pattern() != PUBLISHED[2][-1]
    assert "".join(work.ran() for work in script.counters) == stats["pattern"]
    switch = stats["experts"]["low"]["first_step"]
    low = [p for p in stats["passes"] if p["expert"] == "low"]
    assert low[0]["step"] == switch and [p["reason"] for p in low[:11]] == ["warmup"] * 11  # int(0.4 * 28)


def test_cache_storage_flags_reach_both_experts(script):
    """--cache_dtype bf16 on the README's T2V-A14B command: the same schedule over both experts, residuals kept in
    bf16 (half the bytes of the float32 tiny experts' residual)."""
    argv = replaced(command_argv(MAGCACHE_COMMANDS[2]), "--size", TINY_SIZE)
    argv = replaced(argv, "--ckpt_dir", argv[argv.index("--ckpt_dir") + 1].lstrip("/"))
    argv += ["--frame_num", "5", "--save_file", "out/x.mp4"]
    assert script("magcache", argv) == 0
    plain = read_json(script.dir / "out" / "x.stats.json")
    assert script("magcache", argv + ["--cache_dtype", "bf16", "--cache_device", "cpu"]) == 0
    half = read_json(script.dir / "out" / "x.stats.json")
    assert half["pattern"] == plain["pattern"] == PUBLISHED[2][-1]
    assert "residuals kept in bf16 on cpu" in half["notes"]
    assert half["cache_peak_bytes"]["cond"] * 2 == plain["cache_peak_bytes"]["cond"]


@pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning")
def test_published_easycache_command_runs(script, capsys):
    """The T2V-A14B command at its 40 steps: as published (the tiny random experts change too much per step for
    0.06 to reuse anything), then with a budget they reuse under, and every reused pass ran no block."""
    argv = replaced(command_argv(EASYCACHE_COMMANDS[0]), "--size", TINY_SIZE) + ["--frame_num", "5"]
    switch = load_profile("wan2.2-t2v-a14b").expert_switch_step(40)
    for run_index, (extra, thresh) in enumerate([([], 0.06), (["--thresh_t2v", "0.3"], 0.3)]):
        capsys.readouterr()
        assert script("easycache", argv + extra + ["--save_file", f"out/x{run_index}.mp4"]) == 0
        assert (f"[stepcache] easycache on profile wan2.2-t2v-a14b: thresh={thresh}, warmup_steps=7"
                in capsys.readouterr().out)
        stats = read_json(script.dir / "out" / f"x{run_index}.stats.json")
        assert (stats["method"], stats["profile"], stats["params"]) == ("easycache", "wan2.2-t2v-a14b",
                                                                         {"thresh": thresh, "warmup_steps": 7})
        pattern = stats["pattern"]
        assert stats["total_passes"] == len(pattern) == 80 and pattern.startswith("C" * 14)  # 7 warm-up steps
        assert pattern.endswith("CC")  # the last step is computed (EasyCache4Wan2.2's GLOBAL_NUM_STEPS - 2)
        assert "".join(work.ran() for work in script.counters[2 * run_index:2 * run_index + 2]) == pattern
        assert [e["first_step"] for e in stats["experts"].values()] == [0, switch]
    assert "." in pattern[:2 * switch] and "." in pattern[2 * switch:]  # precondition: both experts reused


# ---------------------------------------------------------------------------- wrong input, before loading
TINY = ["--size", TINY_SIZE, "--frame_num", "5", "--sample_steps", "8"]


@pytest.mark.parametrize("method, argv, message", [
    ("teacache", ["--task", "t2v-A14B", "--ckpt_dir", "ckpt-t2v"],
     "no TeaCache coefficients are published for Wan2.2: fit them on your model with `stepcache calibrate`"),
    ("teacache", ["--task", "i2v-A14B", "--ckpt_dir", "ckpt-i2v", "--image", "examples/i2v_input.JPG"],
     "no TeaCache coefficients are published for Wan2.2: fit them on your model with `stepcache calibrate`"),
    ("teacache", ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v"],
     "no TeaCache coefficients are published for Wan2.2: fit them on your model with `stepcache calibrate`"),
    ("teacache", ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v", "--image", "examples/i2v_input.JPG"],
     "no TeaCache coefficients are published for Wan2.2: fit them on your model with `stepcache calibrate`"),
    ("easycache", ["--task", "i2v-A14B", "--ckpt_dir", "ckpt-i2v", "--image", "examples/i2v_input.JPG"],
     "EasyCache4Wan2.2 publishes no setting for --task i2v-A14B"),
    ("easycache", ["--task", "t2v-A14B", "--ckpt_dir", "ckpt-t2v", "--thresh", "0.1"],
     "--thresh is not read for --task t2v-A14B (the published script reads --thresh_t2v); set --thresh_t2v"),
    ("easycache", ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v", "--thresh_t2v", "0.1"],
     "--thresh_t2v is not read for --task ti2v-5B (the published script reads --thresh); set --thresh instead"),
    ("magcache", ["--task", "animate-14B", "--ckpt_dir", "ckpt-t2v", "--use_magcache", "--size", "1280*720"],
     "--task animate-14B runs a model whose extra blocks these scripts do not patch"),
    ("magcache", ["--task", "t2v-A14B", "--ckpt_dir", "ckpt-t2v", "--use_magcache", "--cache_profile",
                  "wan2.1-t2v-14b"], "--cache_profile 'wan2.1-t2v-14b' is for 'wan2.1' models, not Wan2.2"),
    ("magcache", ["--task", "t2v-A14B", "--ckpt_dir", "ckpt-t2v", "--use_magcache", "--cache_profile",
                  "wan2.2-i2v-a14b"], "measured on a Wan2.2 I2V model, but --task t2v-A14B runs T2V"),
    ("magcache", ["--task", "i2v-A14B", "--ckpt_dir", "ckpt-i2v", "--use_magcache", "--image", "missing.png"],
     "--image 'missing.png' does not exist"),
    ("easycache", ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v", "--image", "missing.png"],
     "--image 'missing.png' does not exist"),
    ("magcache", ["--task", "t2v-A14B", "--ckpt_dir", "only-low", "--use_magcache"],
     "--ckpt_dir 'only-low' has no high_noise_model/config.json (the DiT config upstream loads for --task "
     "t2v-A14B)"),
    ("magcache", ["--task", "t2v-A14B", "--ckpt_dir", "Wan2.2-T2V-A14B-missing", "--use_magcache"],
     "--ckpt_dir 'Wan2.2-T2V-A14B-missing' does not exist; give the folder of the downloaded --task t2v-A14B "
     "checkpoint"),
    ("magcache", ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v", "--use_magcache", "--cache_experts", "separate"],
     "--cache_experts applies to the two-expert tasks; --task ti2v-5B runs one model"),
    ("magcache", ["--task", "t2v-A14B", "--ckpt_dir", "ckpt-t2v", "--cache_experts", "separate"],
     "--cache_experts has no effect without --use_magcache"),
], ids=["teacache-t2v", "teacache-i2v", "teacache-ti2v", "teacache-ti2v-image", "easycache-i2v", "thresh-t2v",
        "thresh_t2v-ti2v", "animate", "wan21-profile", "i2v-profile-on-t2v", "i2v-missing-image",
        "ti2v-missing-image", "no-high-noise-model", "no-ckpt-dir", "experts-on-ti2v", "experts-uncached"])
def test_wrong_combinations_fail_before_loading(up, script, capsys, method, argv, message):
    checkpoint_layout("only-low", up.configs.WAN_CONFIGS["t2v-A14B"], experts=False)
    assert os.path.isfile("only-low/low_noise_model/config.json")
    capsys.readouterr()
    assert script(method, TINY + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{method}_generate.py: error: ") and message in err[0], err
    assert script.made == [] and not os.path.exists("out")


def test_readme_command_without_weights_stops_before_upstream_builds_anything(script, capsys):
    """The published command verbatim where its --ckpt_dir was never downloaded (the README's own machine's path):
    one line, exit 2, and no sampler constructed (upstream would build umt5-xxl first)."""
    assert script("magcache", command_argv(MAGCACHE_COMMANDS[2])) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "magcache_generate.py: error: --ckpt_dir '/data/mzh/pretrained_weights/Wan-AI/Wan2.2-T2V-A14B' does not "
        "exist; give the folder of the downloaded --task t2v-A14B checkpoint"]
    assert script.made == []


# ------------------------------------------------------------------------------------------ calibration
@pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning")
def test_calibration_writes_a_two_expert_profile_that_a_second_run_loads(up, script, capsys, monkeypatch):
    # The calibrated file names the model it measured (the tiny one); make --task describe that model too.
    tiny_cfg = copy.deepcopy(up.configs.WAN_CONFIGS["t2v-A14B"])
    tiny_cfg.num_layers, tiny_cfg.num_heads = 3, 2
    monkeypatch.setitem(up.configs.WAN_CONFIGS, "t2v-A14B", tiny_cfg)
    common = ["--task", "t2v-A14B", "--size", TINY_SIZE, "--ckpt_dir", "ckpt-t2v", "--frame_num", "5",
              "--sample_steps", str(STEPS), "--base_seed", "3", "--prompt", "a cat"]
    assert script("magcache", common + ["--magcache_calibration", "--save_file", "out/cal.mp4"]) == 0
    path = script.dir / "out" / "cal.magcache-profile.json"  # default: next to the video
    stats = read_json(script.dir / "out" / "cal.stats.json")
    assert stats["calibration_file"] == "out/cal.magcache-profile.json" and stats["pattern"] == "C" * 2 * STEPS
    profile = load_profile(str(path))
    sampler = script.made[0]
    switch = high_noise_steps(up, sampler, STEPS)
    assert 0 < switch < STEPS
    shipped = load_profile("wan2.2-t2v-a14b")
    experts = profile.data["model"]["experts"]
    assert experts["switch_step"] == switch and experts["steps"] == STEPS
    assert {k: experts[k] for k in ("boundary", "num_train_timesteps")} == {
        k: shipped.experts[k] for k in ("boundary", "num_train_timesteps")}
    assert profile.expert_switch_step(STEPS) == switch
    table = profile.method("magcache")
    assert table["retention_zones"] == shipped.data["magcache"]["retention_zones"]
    assert table["steps"] == STEPS and table["branches"] == ["cond", "uncond"] and len(table["ratios"]) == 2 * STEPS
    assert table["ratios"][:2] == [1.0, 1.0] and profile.data["model"]["config"]["num_layers"] == 3
    assert profile.has("easycache") and profile.data["model"]["task"] == "t2v"

    # The ratios are what the residuals of an uncached run of the same experts give, measured here independently,
    # across the switch too (the low expert's first residual against the high expert's last).
    fresh = bare_sampler(up, "t2v")
    residuals, inputs = {0: [], 1: []}, []
    for model in models_of(fresh):
        model.blocks[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        model.blocks[-1].register_forward_hook(
            lambda m, a, out: residuals[(len(inputs) - 1) % 2].append(out - inputs[-1]))
    run_t2v(fresh, steps=STEPS, seed=3, offload_model=True)
    for branch in (0, 1):
        r = residuals[branch]
        expected = [(r[i].norm(dim=-1) / r[i - 1].norm(dim=-1)).mean().item() for i in range(1, STEPS)]
        assert table["ratios"][2 + branch::2] == pytest.approx(expected, abs=1e-5)

    capsys.readouterr()
    assert script("magcache", common + ["--use_magcache", "--cache_profile", str(path), "--save_file",
                                        "out/use.mp4"]) == 0
    stats = read_json(script.dir / "out" / "use.stats.json")
    assert stats["profile"] == profile.name and stats["profile_file"] == str(path)
    assert stats["params"] == {"thresh": 0.04, "K": 2, "retention_ratio": 0.2}
    expected = simulate(resolve_method("magcache", profile, thresh=0.04, K=2, retention_ratio=0.2), STEPS)
    assert stats["pattern"] == expected.pattern() and len(stats["pattern"]) == 2 * STEPS
    assert stats["experts"]["low"]["first_step"] == switch
    assert "".join(work.ran() for work in script.counters[2:]) == stats["pattern"]


# ---------------------------------------------------------------------------------------- failed saves
def write_nothing(tensor, save_file=None, **kwargs):
    """upstream's save_video when its writer fails: it logs and returns None, leaving no file."""


def write_empty(tensor, save_file=None, **kwargs):
    open(save_file, "wb").close()


@pytest.mark.parametrize("saver", ["nothing", "empty", "upstream"])
def test_a_video_upstream_could_not_write_fails_without_stats(up, script, capsys, monkeypatch, saver):
    """Wan2.2's save_video returns None whether or not it wrote the file: the file having content is the check.
    The script exits 1 with one line and leaves neither a video nor a stats file naming one."""
    if saver == "upstream":  # upstream's own, its writer (or, without torchvision, make_grid) failing in its try
        def no_room(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(up.generate, "save_video", up.utils.save_video)
        monkeypatch.setattr(up.utils.imageio, "get_writer", no_room)
    else:
        monkeypatch.setattr(up.generate, "save_video", write_nothing if saver == "nothing" else write_empty)
    argv = ["--task", "ti2v-5B", "--ckpt_dir", "ckpt-ti2v", "--use_magcache", "--save_file", "out/v.mp4"] + TINY
    assert script("magcache", argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line and line.strip()]
    assert err == ["magcache_generate.py: error: upstream's save_video did not write 'out/v.mp4': nothing was "
                   "written to out/v.mp4; no video and no stats were written"]
    assert os.listdir("out") == []  # no video, no partial file, no stats
    assert script.counters[0].calls > 0  # the generation itself ran
