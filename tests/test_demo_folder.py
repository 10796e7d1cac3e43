"""The demo model as a standard diffusers pipeline folder (`stepcache demo --save-pipeline DIR`): it loads in a
Python without stepcache, gives the demo's exact latents, and stepcache's commands take it as any folder."""
import json
import subprocess
import sys

import pytest
import torch

import stepcache
from stepcache.runner import NothingCachedWarning
from stepcache.wan21.demo import pipeline_folder
from stepcache.wan21.demo.model import DemoPipeline, load
from stepcache.wan21.demo.scenes import BACKGROUNDS, COLOUR_NAMES, DIRECTION_NAMES, SHAPES
from stepcache.wan21.demo.text import MAX_TOKENS, WordTokenizer

PROMPTS = ["a red square moving right on a dark background", "a blue disc moving up on a light background"]


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    return pipeline_folder.save(tmp_path_factory.mktemp("demo") / "pipe", model)


def _reference(model, steps=6):
    """The demo's own wrapper around WanPipeline (its sizes passed explicitly)."""
    return DemoPipeline(model).latents(PROMPTS, list(range(len(PROMPTS))), steps=steps)


def _latents(pipe, steps=6):
    """A call at the folder pipeline's own defaults."""
    generators = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    with torch.inference_mode():
        return pipe(PROMPTS, num_inference_steps=steps, generator=generators, output_type="latent").frames


def test_the_tokenizer_gives_the_demo_ids():
    """transformers' fast tokenizer built from the word table gives the demo tokenizer's ids and mask, for every
    vocabulary word, capitals, punctuation and unknown words."""
    ours = WordTokenizer()
    fast = pipeline_folder.build_tokenizer(ours)
    texts = [*PROMPTS, "A RED Square, moving... right!", "a purple triangle moving sideways", "", "  disc  ",
             " ".join([*COLOUR_NAMES[:3], *SHAPES, *DIRECTION_NAMES[:2], *BACKGROUNDS[:1]])]
    for text in texts:
        want = ours(text, max_length=MAX_TOKENS)
        got = fast(text, padding="max_length", max_length=MAX_TOKENS, truncation=True, add_special_tokens=True,
                   return_attention_mask=True, return_tensors="pt")
        assert torch.equal(got.input_ids, want.input_ids), text
        assert torch.equal(got.attention_mask, want.attention_mask), text


def test_the_folder_gives_the_demo_latents_exactly(folder, model):
    """stepcache's loader (its own copy of the folder's code) runs the same WanPipeline loop on the same numbers."""
    want = _reference(model)
    got = _latents(pipeline_folder.load(folder))
    assert torch.equal(got, want)


def test_it_loads_without_stepcache_with_diffusers_own_loader(folder, model, tmp_path):
    """DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) in a Python where stepcache cannot be
    imported: the folder's own code and transformers' classes (the tokenizer named as transformers 4 and 5 both
    know it), and the demo's latents; without trust_remote_code diffusers refuses (the folder carries code)."""
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    out = tmp_path / "latents.pt"
    script = f"""
import sys
sys.modules["stepcache"] = None  # importing stepcache fails in this process
import torch
from diffusers import DiffusionPipeline
try:
    DiffusionPipeline.from_pretrained({str(folder)!r})
    raise SystemExit("loaded without trust_remote_code")
except ValueError as exc:
    assert "trust_remote_code" in str(exc), exc
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
import transformers
assert isinstance(pipe.tokenizer, transformers.PreTrainedTokenizerFast), type(pipe.tokenizer)
print(type(pipe).__name__, type(pipe.vae).__name__, type(pipe.text_encoder).__name__)
generators = [torch.Generator().manual_seed(s) for s in range({len(PROMPTS)})]
with torch.inference_mode():
    latents = pipe({PROMPTS!r}, num_inference_steps=6, generator=generators, output_type="latent").frames
    video = pipe({PROMPTS[0]!r}, num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                 output_type="np").frames[0]
assert video.shape == (8, 32, 32, 3), video.shape
torch.save(latents, {str(out)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:3] == ["StepcacheDemoPipeline", "DemoLinearCodec", "OPTModel"]
    assert torch.equal(torch.load(out, weights_only=True), _reference(model))


def test_stepcache_runs_no_code_from_the_folder(folder, tmp_path):
    """A folder whose pipeline.py and codec would run code on import still loads through stepcache, which uses its
    own copy of both."""
    import shutil
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    for path in (copy / "pipeline.py", copy / "vae" / "demo_codec.py"):
        path.write_text("raise RuntimeError('folder code ran')\n")
    pipe = pipeline_folder.load(copy)
    assert type(pipe).__module__ == "stepcache.wan21.demo.folder.pipeline"


def test_threshold_zero_on_the_folder_pipeline_is_bit_identical(folder):
    pipe = pipeline_folder.load(folder)
    baseline = _latents(pipe)
    for method in ("teacache", "magcache", "easycache"):
        stepcache.enable(pipe, method, profile=str(folder / "stepcache-profile.json"), thresh=0.0)
        with pytest.warns(NothingCachedWarning):
            assert torch.equal(_latents(pipe), baseline), method
        stepcache.disable(pipe)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=str(cwd))


def test_generate_and_calibrate_take_the_folder_at_its_own_sizes_and_profile(folder, tmp_path):
    """No size flags: the demo's 32x32, 8 frames, 30 steps and fp32; no --profile: the folder's own."""
    result = _cli("generate", "--model", str(folder), "--prompt", PROMPTS[0], "--device", "cpu", "--out",
                  str(tmp_path / "out" / "red.mp4"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from " + str(folder / "stepcache-profile.json") in result.stdout
    stats = json.loads((tmp_path / "out" / "red.stats.json").read_text())
    assert stats["profile"] == "wan2.1-demo-tiny" and stats["total_passes"] == 60
    assert stats["computed_passes"] < 60
    result = _cli("calibrate", "--model", str(folder), "--prompt", PROMPTS[1], "--steps", "12", "--device", "cpu",
                  "--out", str(tmp_path / "mine.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "mine.json").read_text())
    assert data["magcache"]["steps"] == 12 and data["measured_on"]["resolution"] == [32, 32]
    assert data["easycache"]["warmup_steps"] == json.loads(
        (folder / "stepcache-profile.json").read_text())["easycache"]["warmup_steps"]  # kept from the folder's


def test_save_pipeline_refuses_a_folder_with_other_content_and_replaces_its_own(folder, tmp_path, capsys,
                                                                               monkeypatch):
    from stepcache.cli import main   # in this process: the subprocess runs above cover the installed command
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--save-pipeline", str(other)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--save-pipeline" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    again = tmp_path / "again"
    assert main(["demo", "--save-pipeline", str(again)]) == 0
    (again / "stale.txt").write_text("from before")
    assert main(["demo", "--save-pipeline", str(again)]) == 0
    assert not (again / "stale.txt").exists() and pipeline_folder.is_demo_folder(again)


def test_a_folder_naming_code_stepcache_does_not_know_is_refused(tmp_path):
    from stepcache.generate import GenerateError, pipeline_of
    for name in (["pipeline", "SomethingElse"], ["pipeline", "WanPipeline"], "StepcacheDemoPipeline"):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(GenerateError, match="unsupported pipeline class"):
            pipeline_of(tmp_path)
