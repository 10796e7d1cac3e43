"""The demo model (issue 9): scenes and read-back, codec, prompt encoder, training and exact resume, loading
offline into a real WanPipeline, and `stepcache demo`. Tests of trained quality are in test_demo_trained.py."""
import json
import socket

import pytest

from stepcache.errors import InputError
import torch

from stepcache.wan21.demo import codec, scenes, text
from stepcache.wan21.demo import train as demo_train

TINY = dict(batch=2, codec_clips=16, progress=False, check=0)


def test_scenes_are_determined_by_the_generator():
    a_scenes, a = scenes.make_batch(6, torch.Generator().manual_seed(3))
    b_scenes, b = scenes.make_batch(6, torch.Generator().manual_seed(3))
    _, c = scenes.make_batch(6, torch.Generator().manual_seed(4))
    assert a_scenes == b_scenes and torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 3, scenes.FRAMES, scenes.SIZE, scenes.SIZE) and 0 <= a.min() and a.max() <= 1
    assert len(scenes.ALL_SCENES) == 144 and scenes.parse_prompt(a_scenes[0].prompt) == a_scenes[0]


def test_read_back_scores_ground_truth_clips_100_percent():
    g = torch.Generator().manual_seed(0)
    clips = scenes.render(scenes.ALL_SCENES, g)  # every prompt once
    assert all(scenes.read_back(v).matches(s) for s, v in zip(scenes.ALL_SCENES, clips))
    uint8 = (clips[:4].permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8)  # (T, H, W, 3) uint8 layout too
    assert all(scenes.read_back(v).matches(s) for s, v in zip(scenes.ALL_SCENES[:4], uint8))
    grey = torch.full((3, scenes.FRAMES, 32, 32), 0.5)
    assert not scenes.read_back(grey).valid
    still = clips[0].clone()
    still[:, 1:] = still[:, :1]  # no motion
    assert not scenes.read_back(still).valid


def test_codec_round_trip_and_unit_variance():
    clips = scenes.make_batch(64, torch.Generator().manual_seed(0))[1]
    c = codec.fit(clips)
    z = c.encode(clips)
    assert z.shape == (64, 16, scenes.FRAMES, 8, 8)
    assert torch.allclose(z.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=0.02)
    assert torch.allclose(c.basis.T @ c.basis, torch.eye(16), atol=1e-5)
    held_out = scenes.make_batch(16, torch.Generator().manual_seed(1))[1]
    mse = ((c.decode(c.encode(held_out)) - held_out) ** 2).mean()
    assert 10 * torch.log10(1 / mse) > 30
    again = codec.LinearCodec.from_state_dict(c.state_dict())
    assert torch.equal(again.encode(held_out), c.encode(held_out))


@pytest.mark.parametrize("mode, clock_channels", [("t", 1), (True, 1), ("txy", 3)])
def test_codec_clock_channels_say_when_and_where(mode, clock_channels):
    clips = scenes.make_batch(32, torch.Generator().manual_seed(0))[1]
    c = codec.fit(clips, clock=mode)
    z = c.encode(clips)
    assert c.channels == 16 and c.basis.shape[1] == 16 - clock_channels
    ramp = codec.clock_ramp(8)
    clock = z[:, 16 - clock_channels:]
    # the same ramps in every clip: over the frames, then (txy) across the width and down the height
    assert torch.equal(clock[:, 0], ramp.view(1, 8, 1, 1).expand(32, 8, 8, 8))
    if clock_channels == 3:
        assert torch.equal(clock[:, 1], ramp.view(1, 1, 1, 8).expand(32, 8, 8, 8))
        assert torch.equal(clock[:, 2], ramp.view(1, 1, 8, 1).expand(32, 8, 8, 8))
    # decoding ignores the clock: changing it changes nothing
    shifted = z.clone()
    shifted[:, 16 - clock_channels:] += 1
    assert torch.equal(c.decode(shifted), c.decode(z))
    mse = ((c.decode(z) - clips) ** 2).mean()
    assert 10 * torch.log10(1 / mse) > 30
    again = codec.LinearCodec.from_state_dict(c.state_dict())
    assert torch.equal(again.encode(clips), z)


def test_tokenizer_pads_and_ends_like_t5():
    tok = text.WordTokenizer()
    out = tok(["a red disc moving left on a dark background", ""], max_length=text.MAX_TOKENS)
    assert out.input_ids.shape == (2, text.MAX_TOKENS)
    assert out.attention_mask.sum(1).tolist() == [10, 1]   # 9 words + </s>; the empty prompt is </s> alone
    assert tok.ids("a purple disc")[1] == tok.vocab[text.UNK]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step training run, and the same run stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("demo-train")
    full = demo_train.train(root / "full", steps=3, **TINY)
    demo_train.train(root / "split", steps=3, stop_at=2, **TINY)
    assert not (root / "split" / demo_train.EXPORT).exists()
    resumed = demo_train.train(root / "split", resume=True, progress=False, check=0)
    return root, full, resumed


def test_training_resumes_bit_exactly(tiny_run):
    root, full, resumed = tiny_run
    assert full.step == resumed.step == 3
    for name in ("model", "ema_model", "text", "ema_text"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    log = (root / "split" / demo_train.LOSS_LOG).read_text().splitlines()
    assert [row.split(",")[0] for row in log] == ["step", "1", "2", "3"]
    assert (root / "split" / demo_train.LOSS_LOG).read_text().split(",")[:6] == \
        (root / "full" / demo_train.LOSS_LOG).read_text().split(",")[:6]
    from safetensors import safe_open
    files = [safe_open(str(root / run / demo_train.EXPORT), "pt") for run in ("full", "split")]
    assert files[0].metadata() == files[1].metadata() and files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())


def test_training_refuses_to_overwrite_or_change_the_schedule(tiny_run):
    root, _, _ = tiny_run
    with pytest.raises(InputError, match="--resume"):
        demo_train.train(root / "full", steps=3, **TINY)
    with pytest.raises(InputError, match="3 steps"):
        demo_train.train(root / "full", steps=5, resume=True, progress=False)


def test_loader_builds_a_real_wan_pipeline_offline(tiny_run, monkeypatch):
    from diffusers import WanPipeline

    from stepcache.wan21.demo import model as demo_model

    def no_network(*args, **kwargs):
        raise AssertionError("the demo model must load without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = tiny_run[0] / "full" / demo_train.EXPORT
    assert path.stat().st_size < 10e6
    demo = demo_model.DemoPipeline(demo_model.load(path))
    assert isinstance(demo.pipe, WanPipeline)
    prompt = "a red disc moving left on a dark background"
    embeds, negative = demo.pipe.encode_prompt([prompt], negative_prompt=[""], max_sequence_length=text.MAX_TOKENS)
    model = demo.model
    assert torch.equal(embeds, model.text_encoder.encode(model.tokenizer, [prompt]))  # what training conditions on
    assert torch.equal(negative, model.text_encoder.encode(model.tokenizer, [""]))    # what CFG dropout shows
    video = demo([prompt, prompt], [1, 1], steps=3)
    assert video.shape == (2, scenes.FRAMES, scenes.SIZE, scenes.SIZE, 3) and video.dtype == torch.uint8
    assert torch.equal(video[0], video[1])
    with pytest.raises(demo_model.WeightsMissing, match="train"):
        demo_model.load(tiny_run[0] / "nothing.safetensors")


def test_demo_help_says_what_it_does(capsys):
    from stepcache.cli import main
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "report.json" in out and "fewer steps" in out and "--out" in out


def test_quick_demo_writes_report(tiny_run, tmp_path):
    from stepcache.wan21.demo import model as demo_model
    from stepcache.wan21.demo.run import main
    profile = demo_model.PROFILE
    if not profile.exists():
        pytest.skip(f"no demo profile at {profile} yet (made by calibrate_demo on the trained model)")
    weights = tiny_run[0] / "full" / demo_train.EXPORT
    out = tmp_path / "demo"
    code = main(["--out", str(out), "--weights", str(weights), "--num-prompts", "1", "--steps", "6",
                 "--presets", "medium", "--repeats", "1", "--no-progress"])
    report = json.loads((out / "report.json").read_text())
    assert code == (0 if report["medium_check"]["ok"] else 1)  # a 3-step model may well fail the check
    assert set(report["methods"]) == {"teacache", "magcache", "easycache"}
    for method, by_preset in report["methods"].items():
        entry = by_preset["medium"]
        for key in ("computed_passes", "total_passes", "wall_speedup", "ideal_speedup", "psnr", "ssim"):
            assert key in entry and key in entry["fewer_steps"], (method, key)
        assert entry["total_passes"] == 12 and entry["fewer_steps"]["steps"] <= 6
    assert "medium_check" in report
    assert (out / "side_by_side.mp4").stat().st_size > 0 and (out / "patterns.png").exists()
