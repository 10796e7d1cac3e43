"""`stepcache generate` and `stepcache calibrate` end to end on complete HunyuanVideo 1.5 diffusers pipeline folders
(tests/hunyuan15_folder.py: tiny random components of the classes the pipelines load, text encoders and tokenizers
included, saved with ``save_pretrained``), in this process through the command's ``main``.

Each run's video is caught on its way to ``export_to_video`` (the float frames the pipeline returned), so threshold 0
is compared with ``--method none`` bit for bit; the loaded pipeline is caught too, to check that the prompt went
through the pipeline's own chat template, crop and glyph (ByT5) path, and the first frame through SigLIP."""
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import hunyuan15_folder as F  # noqa: E402
import hunyuan15_tiny as T  # noqa: E402
from stepcache import generate as generate_module  # noqa: E402
from stepcache.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning",
                                        "ignore::stepcache.profiles.ResolutionWarning",
                                        "ignore::stepcache.profiles.ProfileFitWarning")

STEPS = 6
PASSES = 2 * STEPS  # the guider's two calls per step (guidance 6)
PROMPT = 'a red ball rolls past a sign that says "STOP"'  # quoted text: the ByT5 glyph encoder runs
SIZE = ["--frames", "5", "--steps", str(STEPS), "--dtype", "fp32", "--device", "cpu"]
T2V_SIZE = ["--height", "32", "--width", "32", *SIZE]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hv15")
    frame = root / "frame.png"
    T.image(size=32).save(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"t2v": F.save_t2v_folder(root / "t2v"), "i2v": F.save_i2v_folder(root / "i2v"), "frame": frame,
                "root": root}


class Run:
    """One command: its exit code, the frames it wrote, its stats, and what the pipeline's encoders were given."""

    def __init__(self):
        self.code = None
        self.frames: list[np.ndarray] = []
        self.pipes = []
        self.inputs: dict[str, list[dict]] = {}
        self.stats: dict = {}

    @property
    def video(self) -> np.ndarray:
        assert len(self.frames) == 1, len(self.frames)
        return self.frames[0]


@contextmanager
def watching(run: Run):
    """Catch the frames handed to diffusers' export_to_video, and hook the loaded pipeline's encoders."""
    import diffusers.utils
    export, load = diffusers.utils.export_to_video, generate_module.load_pipeline

    def exporting(frames, path, **kwargs):
        run.frames.append(np.stack([np.asarray(f) for f in frames]).copy())
        return export(frames, path, **kwargs)

    def loading(*args):
        pipe = load(*args)
        run.pipes.append(pipe)
        for name in ("text_encoder", "text_encoder_2", "image_encoder", "transformer"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.register_forward_pre_hook(
                    lambda m, a, kw, name=name: run.inputs.setdefault(name, []).append(
                        {k: v.detach().clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}),
                    with_kwargs=True)
        return pipe

    with mock.patch.object(diffusers.utils, "export_to_video", exporting), \
            mock.patch.object(generate_module, "load_pipeline", loading):
        yield run


def stepcache(*argv) -> Run:
    run = Run()
    with watching(run), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.code = main([str(a) for a in argv])
    if "--out" in argv and argv[0] == "generate":
        stats = Path(argv[argv.index("--out") + 1]).with_suffix(".stats.json")
        if stats.exists():
            run.stats = json.loads(stats.read_text())
    return run


def generate(folder, out, *args, prompt=PROMPT) -> Run:
    run = stepcache("generate", "--model", folder, "--prompt", prompt, *args, "--fps", "4", "--out", out)
    assert run.code == 0
    assert Path(out).is_file() and Path(out).stat().st_size > 0 and Path(out).with_suffix(".stats.json").is_file()
    return run


@pytest.fixture(scope="module")
def t2v_baseline(folders):
    return generate(folders["t2v"], folders["root"] / "none" / "t2v.mp4", "--method", "none", *T2V_SIZE)


def test_the_folder_is_the_pipelines_own_components(folders):
    index = json.loads((folders["i2v"] / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideo15ImageToVideoPipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLTextModel"]
    assert index["tokenizer"][1] == "Qwen2Tokenizer" and index["tokenizer_2"][1] == "ByT5Tokenizer"
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["image_encoder"] == ["transformers", "SiglipVisionModel"]
    assert index["guider"] == ["diffusers", "ClassifierFreeGuidance"]
    # the pipeline's crop (108) cuts inside the system message, never into the prompt
    assert F.template_prefix_length(F.qwen_tokenizer()) > 108


def test_t2v_generate_uncached_and_magcache(folders, t2v_baseline, tmp_path):
    base = t2v_baseline
    assert base.video.shape == (5, 32, 32, 3) and base.stats["method"] == "none"
    # the pipeline's own text path: the chat template padded to 1000 + 108 tokens, the first 108 cropped, the
    # prompt intact at the end; ByT5 on the quoted text (the empty negative prompt has none)
    pipe = base.pipes[0]
    qwen = base.inputs["text_encoder"]
    assert len(qwen) == 2 and qwen[0]["input_ids"].shape == (1, 1108)
    kept = qwen[0]["input_ids"][0, 108:][qwen[0]["attention_mask"][0, 108:].bool()]
    assert pipe.tokenizer.decode(kept).endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    byt5 = base.inputs["text_encoder_2"]
    assert len(byt5) == 1 and byt5[0]["input_ids"].shape == (1, 256)
    first = base.inputs["transformer"][0]
    assert first["encoder_hidden_states"].shape[1] == 1000 and first["encoder_hidden_states_2"].shape[1] == 256
    assert len(base.inputs["transformer"]) == PASSES

    cached = generate(folders["t2v"], tmp_path / "mag" / "t2v.mp4", "--method", "magcache", "--profile",
                      "hunyuanvideo1.5-t2v-20steps", "--thresh", "0.5", "--K", "2", *T2V_SIZE)
    stats = cached.stats
    assert stats["profile"] == "hunyuanvideo1.5-t2v-20steps" and stats["total_passes"] == PASSES
    assert "." in stats["pattern"] and 0 < stats["computed_passes"] < PASSES
    assert set(stats["branches"]) == {"pred_cond", "pred_uncond"}
    assert len(cached.inputs["transformer"]) == PASSES     # every call reached the model; the reuse is inside
    assert not np.array_equal(cached.video, base.video)    # a reused pass changes the video: the check below can fail

    zero = generate(folders["t2v"], tmp_path / "zero" / "t2v.mp4", "--method", "magcache", "--profile",
                    "hunyuanvideo1.5-t2v-20steps", "--thresh", "0", *T2V_SIZE)
    assert zero.stats["pattern"] == "C" * PASSES
    assert np.array_equal(zero.video, base.video)
    manifest = json.loads((tmp_path / "mag" / "manifest.json").read_text())
    assert manifest["videos"]["t2v.mp4"]["computed_passes"] == stats["computed_passes"]


@pytest.fixture(scope="module")
def i2v_profile(folders):
    """`stepcache calibrate` on the image-to-video folder (no shipped table fits an image-to-video model)."""
    out = folders["root"] / "i2v-profile.json"
    run = stepcache("calibrate", "--model", folders["i2v"], "--image", folders["frame"], "--prompt", PROMPT, *SIZE,
                    "--out", out)
    assert run.code == 0
    return out


def test_i2v_generate_from_a_first_frame(folders, i2v_profile, tmp_path):
    data = json.loads(i2v_profile.read_text())
    measured = data["measured_on"]
    assert measured["pipeline"] == "HunyuanVideo15ImageToVideoPipeline" and measured["steps"] == STEPS
    assert measured["resolution"] == [32, 32] == data["model"]["resolution"]   # the size the first frame gave
    common = ["--image", folders["frame"], *SIZE]
    base = generate(folders["i2v"], tmp_path / "none" / "i2v.mp4", "--method", "none", *common)
    assert base.video.shape == (5, 32, 32, 3)
    siglip = base.inputs["image_encoder"]
    assert len(siglip) == 1 and siglip[0]["pixel_values"].shape == (1, 3, 16, 16)
    assert base.inputs["transformer"][0]["image_embeds"].shape == (1, 4, T.TINY["image_embed_dim"])

    cached = generate(folders["i2v"], tmp_path / "mag" / "i2v.mp4", "--method", "magcache", "--profile",
                      i2v_profile, "--thresh", "0.5", "--K", "2", *common)
    assert cached.stats["profile"] == "i2v-profile" and cached.stats["total_passes"] == PASSES
    assert "." in cached.stats["pattern"] and not np.array_equal(cached.video, base.video)

    zero = generate(folders["i2v"], tmp_path / "zero" / "i2v.mp4", "--method", "magcache", "--profile", i2v_profile,
                    "--thresh", "0", *common)
    assert zero.stats["pattern"] == "C" * PASSES and np.array_equal(zero.video, base.video)

    other = tmp_path / "other.png"
    T.image(seed=9, size=32).save(other)
    moved = generate(folders["i2v"], tmp_path / "other" / "i2v.mp4", "--method", "magcache", "--profile",
                     i2v_profile, "--thresh", "0", "--image", other, *SIZE)
    assert not np.array_equal(moved.video, base.video)    # the first frame conditions the video


@pytest.mark.parametrize("command", ["calibrate", "generate", "bench", "tune"])
def test_every_command_refuses_a_size_for_the_image_to_video_folder(folders, tmp_path, capsys, command):
    """The image-to-video pipeline sizes the video from its first frame: --height is refused in one line before
    anything loads, never ignored."""
    out = tmp_path / ("p.json" if command in ("calibrate", "tune") else "v.mp4")
    folder, frame = str(folders["i2v"]), str(folders["frame"])
    argv = {"calibrate": ["--model", folder, "--image", frame, "--prompt", "x", "--out", str(out)],
            "generate": ["--model", folder, "--image", frame, "--prompt", "x", "--out", str(out)],
            "bench": ["--pipeline", folder, "--out", str(tmp_path / "bench")],
            "tune": ["--pipeline", folder, "--speedups", "2", "--out", str(out)]}[command]
    assert main([command, *argv, "--height", "480"]) == 2
    assert "--height: this pipeline sizes the video from --image" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists() and not (tmp_path / "bench").exists()


def test_calibrate_then_teacache_and_easycache_on_the_profile(folders, t2v_baseline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue cube slides left on the grass\n")
    profile = tmp_path / "hv15-tiny.json"
    assert stepcache("calibrate", "--model", folders["t2v"], "--prompts", prompts, *T2V_SIZE, "--out",
                     profile).code == 0
    data = json.loads(profile.read_text())
    measured = data["measured_on"]
    assert measured["steps"] == STEPS and measured["prompts"] == 2 and measured["resolution"] == [32, 32]
    assert measured["branches"] == ["pred_cond", "pred_uncond"] and measured["guidance"] == 6.0
    assert measured["pipeline"] == "HunyuanVideo15Pipeline" and data["model"]["family"] == "hunyuanvideo1.5"
    assert data["magcache"]["steps"] == STEPS and len(data["magcache"]["ratios"]) == PASSES
    assert len(data["teacache"]["variants"]["default"]["coefficients"]) == 5 and data["easycache"]["warmup_steps"] >= 1

    base = t2v_baseline.video
    for method, reusing in (("teacache", []), ("easycache", ["--warmup-steps", "1", "--thresh", "2"])):
        cached = generate(folders["t2v"], tmp_path / method / "t2v.mp4", "--method", method, "--profile", profile,
                          *reusing, *T2V_SIZE)
        stats = cached.stats
        assert stats["method"] == method and stats["profile"] == "hv15-tiny" and stats["total_passes"] == PASSES
        assert "." in stats["pattern"], (method, stats["pattern"])
        assert not np.array_equal(cached.video, base), method
        zero = generate(folders["t2v"], tmp_path / f"{method}-zero" / "t2v.mp4", "--method", method, "--profile",
                        profile, "--thresh", "0", *T2V_SIZE)
        assert zero.stats["pattern"] == "C" * PASSES and np.array_equal(zero.video, base), method
