"""The Wan2.2 harness (wan22_official_tiny.py) on upstream's own code (``WAN22_REPO``): its samplers' ``generate()``
loops and its ``generate.py`` run unchanged on the CPU, deterministically, with both A14B experts switched where
upstream's boundary rule says and TI2V's per-token timesteps on its image path."""
import pytest
import torch

from helpers import wan22_checkout
from wan22_official_tiny import (TINY_SIZE, StubVAE22, bare_sampler, cuda_sync_noop, expert_trace,
                                 fake_constructors, high_noise_steps, make_image, parse_args, run_i2v, run_t2v,
                                 run_ti2v, sampling_timesteps, save_video_with_torch, tiny_sizes,
                                 up)  # noqa: F401  (up: the fixture of upstream on the CPU)

REPO = str(wan22_checkout())
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")]
torch.set_num_threads(1)  # as conftest.py: bit-identical reruns

STEPS = 6


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_image(tmp_path_factory.mktemp("img") / "cat.png")


@pytest.mark.parametrize("kind, boundary", [("t2v", 0.875), ("i2v", 0.900)])
def test_a14b_runs_both_experts_switching_at_upstreams_boundary(up, image, kind, boundary):
    sampler = bare_sampler(up, kind)
    assert (sampler.boundary, sampler.num_train_timesteps) == (boundary, 1000)
    run = (lambda **kw: run_t2v(sampler, steps=STEPS, **kw)) if kind == "t2v" else \
        (lambda **kw: run_i2v(sampler, image, steps=STEPS, **kw))
    with expert_trace(sampler) as trace:
        out = run()
    high = high_noise_steps(up, sampler, STEPS)
    assert 0 < high < STEPS  # both experts have steps at this shift
    assert "".join(trace) == "HH" * high + "LL" * (STEPS - high)  # cond + uncond per step, high first
    assert out.shape == (16, 2, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0
    assert torch.equal(run(), out)
    with expert_trace(sampler) as trace:
        assert torch.equal(run(offload_model=True), out)  # upstream's offload moves are no-ops on the CPU
    assert "".join(trace) == "HH" * high + "LL" * (STEPS - high)
    # The experts differ: the low-noise one swapped for a copy of the high-noise one changes the video.
    other = bare_sampler(up, kind, high=sampler.high_noise_model, low=sampler.high_noise_model)
    assert not torch.equal(run_t2v(other, steps=STEPS) if kind == "t2v" else run_i2v(other, image, steps=STEPS), out)


@pytest.mark.parametrize("with_image", [False, True], ids=["t2v", "i2v"])
def test_ti2v_runs_with_per_token_timesteps(up, image, with_image):
    sampler = bare_sampler(up, "ti2v")
    timesteps, latents = [], []
    hook = sampler.model.register_forward_pre_hook(lambda m, a, kw: timesteps.append(kw["t"]), with_kwargs=True)
    encode = sampler.vae.encode
    sampler.vae.encode = lambda videos: latents.append(encode(videos)) or latents[-1]
    try:
        out = run_ti2v(sampler, image if with_image else None)
        assert torch.equal(run_ti2v(sampler, image if with_image else None), out)
    finally:
        hook.remove()
    assert out.shape == (48, 2, 4, 4) and torch.isfinite(out).all() and out.abs().sum() > 0
    steps = sampling_timesteps(up, sampler, 4, sampler.config.sample_shift)
    seq_len = 2 * 2 * 2  # 2 latent frames of 4x4 at stride (4, 16, 16), patches 2x2
    assert len(timesteps) == 2 * 2 * 4  # two runs of 4 steps, cond + uncond
    for i, t in enumerate(timesteps):
        step = steps[i // 2 % 4]
        assert t.shape == (1, seq_len)
        first_frame = torch.zeros(4) if with_image else step.expand(4)  # the image's tokens are at t = 0
        assert torch.equal(t[0], torch.cat([first_frame, step.expand(4)]).to(t.dtype))
    if with_image:
        z = latents[0][0]
        assert z.shape == (48, 1, 4, 4)
        assert torch.equal(out[:, :1], z)  # the first frame stays the image latent; the stub VAE decodes as is
        assert not torch.equal(out[:, 1:], z.expand(-1, 1, -1, -1))
    else:
        assert latents == []
    assert isinstance(sampler.vae, StubVAE22)


@pytest.mark.parametrize("task, steps", [("t2v-A14B", STEPS), ("i2v-A14B", STEPS), ("ti2v-5B", 4)])
def test_generate_py_end_to_end(up, monkeypatch, tmp_path, task, steps):
    """Upstream's parser and generate(args) (offload_model defaulting to True, T5 'on the device'), with the tiny
    samplers behind wan.WanT2V / WanI2V / WanTI2V: the file it saves is what the sampler gives directly."""
    made = []
    for name, build in fake_constructors(up, made).items():
        monkeypatch.setattr(up.wan, name, build, raising=False)
    monkeypatch.setattr(up.generate, "save_video", save_video_with_torch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    make_image(tmp_path / "examples" / "i2v_input.JPG")  # i2v-A14B's default --image
    argv = ["--task", task, "--size", TINY_SIZE, "--ckpt_dir", "./ckpt", "--frame_num", "5", "--sample_steps",
            str(steps), "--base_seed", "0", "--prompt", "a cat", "--save_file", "out/v.mp4"]
    if task == "ti2v-5B":
        argv += ["--image", "examples/i2v_input.JPG"]
    with tiny_sizes(up):
        args = parse_args(up, argv)
        assert args.offload_model is None and args.image == ("examples/i2v_input.JPG" if "i2v" in task else None)
        with cuda_sync_noop():  # generate.py ends with torch.cuda.synchronize()
            up.generate.generate(args)
    assert TINY_SIZE not in up.configs.SIZE_CONFIGS  # the tables are restored
    kind = {"t2v-A14B": "t2v", "i2v-A14B": "i2v", "ti2v-5B": "ti2v"}[task]
    assert args.offload_model is True and len(made) == 1 and made[0].t5_cpu is False  # no --t5_cpu given
    assert type(made[0]) is {"t2v": up.WanT2V, "i2v": up.WanI2V, "ti2v": up.WanTI2V}[kind]
    saved = torch.load(tmp_path / "out" / "v.mp4")
    sampler, picture = bare_sampler(up, kind), "examples/i2v_input.JPG"
    direct = {"t2v": lambda: run_t2v(sampler, steps=steps), "i2v": lambda: run_i2v(sampler, picture, steps=steps),
              "ti2v": lambda: run_ti2v(sampler, picture, steps=steps)}[kind]()
    assert saved.shape == (1, *direct.shape) and torch.equal(saved[0], direct)
