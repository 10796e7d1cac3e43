"""The official-repo drop-ins (Wan2.1's *_generate.py, HunyuanVideo's *_sample_video.py) on bad input and failed
runs, without an upstream checkout: a stand-in for upstream's generate.py module with upstream's contract (its
parser, its generate(args), its cache_video that prints a failure and returns None), upstream's config tables
reduced to the file names the loaders open, and a toy HYVideoDiffusionTransformer with upstream's block call
convention. The same behaviour on upstream's own code is checked in test_wan_official.py and
test_hunyuan_official.py (WAN21_REPO / HUNYUANVIDEO_REPO)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from wan_official_tiny import checkpoint_layout
from stepcache.outputs import OutputError
from stepcache.wan21.official_generate import main as wan_main


# ------------------------------------------------------------------------------------------------------ Wan2.1
class Config(dict):
    """Upstream's configs are EasyDicts: keys read as attributes."""
    __getattr__ = dict.__getitem__


# File names as in upstream's wan/configs (what WanT2V/WanI2V.__init__ open under --ckpt_dir).
WAN_T2V = Config(t5_checkpoint="models_t5_umt5-xxl-enc-bf16.pth", t5_tokenizer="google/umt5-xxl",
                 vae_checkpoint="Wan2.1_VAE.pth", num_layers=30, num_heads=12)
WAN_I2V = Config(WAN_T2V, clip_checkpoint="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 clip_tokenizer="xlm-roberta-large", num_layers=40, num_heads=40)


def upstream_cache_video(tensor, save_file=None, fps=30, suffix=".mp4", nrow=8, normalize=True,
                         value_range=(-1, 1), retry=5):
    """Upstream's contract (wan/utils/utils.py): returns the file name, or prints the error and returns None.
    Writing fails here when the tensor holds a NaN, after part of the file was written."""
    with open(save_file, "wb") as handle:
        handle.write(b"\x00" * 64)
        if torch.isnan(tensor).any():
            print("cache_video failed, error: the encoder refused the frames", flush=True)
            return None
        handle.write(tensor.numpy().tobytes())
    return save_file


class FakeWanUpstream(types.ModuleType):
    """What the scripts use of upstream's generate.py. ``generate`` builds no sampler (there is no WanModel
    here): it saves ``video`` with the module's ``cache_video`` as upstream does, and records that it ran."""

    def __init__(self, video: torch.Tensor | None = None, interrupt: bool = False):
        super().__init__("generate")
        self.WAN_CONFIGS = {"t2v-1.3B": WAN_T2V, "i2v-14B": WAN_I2V, "t2i-14B": WAN_T2V}
        self.SIZE_CONFIGS = {"832*480": (832, 480)}
        self.wan = types.SimpleNamespace()
        self.cache_video = upstream_cache_video
        self.video = torch.zeros(3, 2, 4, 4) if video is None else video
        self.interrupt = interrupt
        self.generated = []

    def _parse_args(self):
        parser = argparse.ArgumentParser()
        for flag in ("--task", "--size", "--ckpt_dir", "--save_file", "--image", "--first_frame", "--last_frame",
                     "--prompt"):
            parser.add_argument(flag)
        parser.add_argument("--sample_steps", type=int, default=50)
        parser.add_argument("--frame_num", type=int, default=81)
        args = parser.parse_args(sys.argv[1:])
        args.task, args.size = args.task or "t2v-1.3B", args.size or "832*480"
        return args

    def generate(self, args):
        self.generated.append(args)
        if self.interrupt:
            raise KeyboardInterrupt
        self.cache_video(tensor=self.video[None], save_file=args.save_file, fps=16, nrow=1, normalize=True,
                         value_range=(-1, 1))


@pytest.fixture
def wan_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint_layout(tmp_path / "ckpt", WAN_I2V)
    return tmp_path


def wan_run(upstream, *extra, method="teacache"):
    argv = ["--task", "t2v-1.3B", "--ckpt_dir", "ckpt", "--sample_steps", "8", *extra]
    return wan_main(method, argv, upstream=upstream)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_wan_video_that_upstream_could_not_write_fails_with_one_line(wan_dir, capsys):
    upstream = FakeWanUpstream(video=torch.full((3, 2, 4, 4), float("nan")))
    assert wan_run(upstream, "--save_file", "out/v.mp4") == 1
    out, err = capsys.readouterr()
    assert "cache_video failed" in out  # upstream's own message stays
    assert one_error_line(err) == ("teacache_generate.py: error: upstream's cache_video did not write 'out/v.mp4' "
                                   "(its message is above); no video and no stats were written")
    assert sorted(os.listdir(wan_dir / "out")) == []  # neither the half-written video nor a stats file


def test_wan_video_written_by_upstream_takes_its_name(wan_dir, capsys):
    upstream = FakeWanUpstream(video=torch.ones(3, 2, 4, 4))
    assert wan_run(upstream, "--save_file", "out/v.mp4") == 0
    assert os.listdir(wan_dir / "out") == ["v.mp4"]
    assert (wan_dir / "out" / "v.mp4").read_bytes()[64:] == torch.ones(1, 3, 2, 4, 4).numpy().tobytes()


@pytest.mark.parametrize("task, remove", [
    ("t2v-1.3B", None), ("t2v-1.3B", "models_t5_umt5-xxl-enc-bf16.pth"), ("t2v-1.3B", "google/umt5-xxl"),
    ("t2v-1.3B", "Wan2.1_VAE.pth"), ("t2v-1.3B", "config.json"), ("t2v-1.3B", "diffusion_pytorch_model.safetensors"),
    ("i2v-14B", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"), ("i2v-14B", "xlm-roberta-large"),
])
def test_wan_missing_checkpoint_stops_before_upstream_runs(wan_dir, capsys, task, remove):
    import shutil
    if remove is None:
        shutil.rmtree(wan_dir / "ckpt")
    elif (wan_dir / "ckpt" / remove).is_dir():
        shutil.rmtree(wan_dir / "ckpt" / remove)
    else:
        (wan_dir / "ckpt" / remove).unlink()
    (wan_dir / "i.png").write_bytes(b"png")
    upstream = FakeWanUpstream()
    assert wan_main("teacache", ["--task", task, "--ckpt_dir", "ckpt", "--image", "i.png", "--sample_steps", "8",
                                 "--save_file", "v.mp4"], upstream=upstream) == 2
    line = one_error_line(capsys.readouterr().err)
    assert upstream.generated == []
    assert line.startswith("teacache_generate.py: error: --ckpt_dir 'ckpt' ")
    assert (remove or "does not exist") in line


def test_wan_sharded_dit_needs_every_shard_of_its_index(wan_dir, capsys):
    (wan_dir / "ckpt" / "diffusion_pytorch_model.safetensors").unlink()
    (wan_dir / "ckpt" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", '
        '"b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')
    (wan_dir / "ckpt" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"")
    upstream = FakeWanUpstream()
    assert wan_run(upstream, "--save_file", "v.mp4") == 2
    assert "has no diffusion_pytorch_model-00002-of-00002.safetensors" in one_error_line(capsys.readouterr().err)
    (wan_dir / "ckpt" / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"")
    assert wan_run(upstream, "--save_file", "v.mp4") == 0 and len(upstream.generated) == 1


@pytest.mark.parametrize("flags, message", [
    (["--save_file", "taken/v.mp4"], "--save_file 'taken/v.mp4': 'taken' is a file, not a folder"),
    (["--save_file", "v.txt"], "--save_file 'v.txt' must end in .mp4 or .mkv or .mov or .avi"),
    (["--save_file", "v.mp4", "--cache_stats", "taken/s.json"], "--cache_stats 'taken/s.json': 'taken' is a file"),
    (["--save_file", "taken.mp4"], "--cache_stats 'taken.stats.json' is a folder"),
])
def test_wan_output_paths_are_checked_before_upstream_runs(wan_dir, capsys, flags, message):
    (wan_dir / "taken").write_text("a file")
    (wan_dir / "taken.stats.json").mkdir()
    upstream = FakeWanUpstream()
    assert wan_run(upstream, *flags) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert upstream.generated == []


def test_wan_ctrl_c_is_one_line_and_exit_130(wan_dir, capsys):
    assert wan_run(FakeWanUpstream(interrupt=True), "--save_file", "v.mp4") == 130
    assert one_error_line(capsys.readouterr().err) == ("teacache_generate.py: interrupted; no partial output was "
                                                        "kept")
    assert not (wan_dir / "v.mp4").exists()


MISSING_REQUIREMENTS = [
    # Upstream's generate.py imports wan.configs, which imports easydict: a generate.py that does the same.
    ({"generate.py": "from easydict import EasyDict\n"}, "easydict",
     "sys.argv = ['magcache_generate.py', '--task', 't2v-1.3B']; "
     "from stepcache.wan21.official_generate import run_script; run_script('magcache')",
     "magcache_generate.py: error: upstream Wan2.1 needs the Python module 'easydict', which is not installed: "
     "pip install easydict (or pip install -r requirements.txt in the Wan2.1 checkout)"),
    # Upstream's hyvideo imports loguru: a hyvideo package that does the same.
    ({"hyvideo/__init__.py": "", "hyvideo/config.py": "from loguru import logger\n"}, "loguru",
     "sys.path.insert(0, '.'); sys.argv = ['teacache_sample_video.py']; "
     "from stepcache.hunyuan.official import run_script; run_script('teacache')",
     "teacache_sample_video.py: error: upstream HunyuanVideo needs the Python module 'loguru', which is not "
     "installed: pip install loguru (or pip install -r requirements.txt in the HunyuanVideo checkout)"),
]


@pytest.mark.parametrize("files,module,run,message", MISSING_REQUIREMENTS, ids=["wan21", "hunyuanvideo"])
def test_missing_requirement_names_what_to_install(tmp_path, files, module, run, message):
    """In a process where importing the upstream requirement fails, as it does where it is not installed."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    code = f"import sys; sys.modules[{module!r}] = None; {run}"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == message


# ------------------------------------------------------------------------------------------------ HunyuanVideo
def hy_constants(root: Path):
    """Upstream's hyvideo.constants tables (rooted at MODEL_BASE, as upstream's are)."""
    base = str(root / "ckpts")
    return types.SimpleNamespace(
        MODEL_BASE=base, VAE_PATH={"884-16c-hy": f"{base}/hunyuan-video-t2v-720p/vae"},
        TEXT_ENCODER_PATH={"clipL": f"{base}/text_encoder_2", "llm": f"{base}/text_encoder"},
        TOKENIZER_PATH={"clipL": f"{base}/text_encoder_2", "llm": f"{base}/text_encoder"})


def hy_layout(root: Path) -> argparse.Namespace:
    """A complete HunyuanVideo download (empty placeholder files) and upstream's default flags pointing at it."""
    base = root / "ckpts"
    weight = base / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    fp8 = weight.parent
    for path in (weight, fp8 / "mp_rank_00_model_states_fp8.pt", fp8 / "mp_rank_00_model_states_fp8_map.pt",
                 base / "hunyuan-video-t2v-720p" / "vae" / "config.json",
                 base / "hunyuan-video-t2v-720p" / "vae" / "pytorch_model.pt",
                 base / "text_encoder" / "config.json", base / "text_encoder_2" / "config.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return argparse.Namespace(model_base=str(base), dit_weight=str(weight), use_fp8=False, vae="884-16c-hy",
                              text_encoder="llm", tokenizer="llm", text_encoder_2="clipL", tokenizer_2="clipL")


def use_fp8(args):
    """The published fp8 command: --use-fp8 with the fp8 weight file, whose map upstream opens beside it."""
    args.use_fp8, args.dit_weight = True, args.dit_weight.replace(".pt", "_fp8.pt")
    return args


@pytest.mark.parametrize("break_it, message", [
    (lambda r, a: setattr(a, "model_base", str(r / "nowhere")), "--model-base '{r}/nowhere' does not exist"),
    (lambda r, a: setattr(a, "dit_weight", str(r / "w.pt")), "--dit-weight '{r}/w.pt' does not exist"),
    (lambda r, a: setattr(a, "dit_weight", str(r / "ckpts")), "--dit-weight '{r}/ckpts' is a folder without a "
                                                              "*_model_states.pt file"),
    (lambda r, a: (use_fp8(a), os.unlink(a.dit_weight.replace(".pt", "_map.pt"))),
     "--use-fp8 needs the fp8 map of --dit-weight, '{r}/ckpts/hunyuan-video-t2v-720p/transformers/"
     "mp_rank_00_model_states_fp8_map.pt'"),
    (lambda r, a: os.unlink(r / "ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt"),
     "--vae 884-16c-hy: '{r}/ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt' does not exist (upstream looks "
     "under the MODEL_BASE environment variable, now '{r}/ckpts', not under --model-base)"),
    (lambda r, a: os.unlink(r / "ckpts/text_encoder/config.json"),
     "--text-encoder llm: '{r}/ckpts/text_encoder/config.json' does not exist"),
    (lambda r, a: os.unlink(r / "ckpts/text_encoder_2/config.json"),
     "--text-encoder-2 clipL: '{r}/ckpts/text_encoder_2/config.json' does not exist"),
])
def test_hunyuan_missing_checkpoint_is_named_with_its_flag(tmp_path, break_it, message):
    from stepcache.hunyuan.official import MissingCheckpointError, check_checkpoints
    args = hy_layout(tmp_path)
    check_checkpoints(args, hy_constants(tmp_path))  # complete: nothing to say
    check_checkpoints(use_fp8(argparse.Namespace(**vars(args))), hy_constants(tmp_path))
    break_it(tmp_path, args)
    with pytest.raises(MissingCheckpointError) as info:
        check_checkpoints(args, hy_constants(tmp_path))
    assert message.format(r=tmp_path) in str(info.value)


def test_hunyuan_output_paths_are_checked_and_nothing_is_created(tmp_path):
    from stepcache.hunyuan.official import CachePlan, check_outputs
    (tmp_path / "taken").write_text("a file")

    def args(**kw):
        return argparse.Namespace(**{"save_path": str(tmp_path / "results"), "save_path_suffix": "",
                                     "cache_stats": None, **kw})
    check_outputs(args(), CachePlan(None))
    check_outputs(args(cache_stats=str(tmp_path / "s" / "run.json")),
                  CachePlan(None, calibrate=str(tmp_path / "c.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing was created
    bad = [(args(save_path=str(tmp_path / "taken")), CachePlan(None), "--save-path"),
           (args(save_path=str(tmp_path / "taken" / "x")), CachePlan(None), "--save-path"),
           (args(save_path=str(tmp_path / "r"), save_path_suffix="taken"), CachePlan(None), "--save-path"),
           (args(cache_stats=str(tmp_path / "run.txt")), CachePlan(None), "--cache-stats"),
           (args(), CachePlan(None, calibrate=str(tmp_path / "taken" / "c.json")), "--magcache-calibration")]
    (tmp_path / "r_taken").write_text("a file")
    for a, plan, flag in bad:
        with pytest.raises(OutputError, match=flag):
            check_outputs(a, plan)


class DoubleBlock(nn.Module):
    """Upstream's call convention: ``block(img, txt, vec, ...)`` -> ``(img, txt)``."""

    def __init__(self, dim):
        super().__init__()
        self.img, self.txt = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img, txt, vec, *rest):
        return img + torch.tanh(self.img(img + vec[:, None])), txt + torch.tanh(self.txt(txt))


class SingleBlock(nn.Module):
    """``block(x, vec, txt_len, ...)`` -> ``x``, with x the image tokens then the text tokens."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x, vec, txt_len, *rest):
        return x + torch.tanh(self.linear(x + vec[:, None]))


class HYVideoDiffusionTransformer(nn.Module):
    """A toy with upstream's name, block stacks and forward's output ({"x": latent})."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.double_blocks = nn.ModuleList([DoubleBlock(dim) for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleBlock(dim) for _ in range(2)])
        self.heads_num = 2

    def forward(self, x, t, text_states=None, text_mask=None, text_states_2=None, freqs_cos=None, freqs_sin=None,
                guidance=None, return_dict=True):
        img = x.flatten(2).transpose(1, 2)
        txt = torch.ones(x.shape[0], 3, x.shape[1])
        vec = torch.cos(t[:, None] / 100 * torch.arange(1, x.shape[1] + 1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        h = torch.cat([img, txt], dim=1)
        for block in self.single_blocks:
            h = block(h, vec, txt.shape[1])
        out = h[:, :img.shape[1]].transpose(1, 2).reshape(x.shape)
        return {"x": out} if return_dict else out


@pytest.mark.parametrize("method", ["magcache", "easycache"])  # TeaCache's signal is upstream's modulate()
def test_hunyuan_official_passes_are_the_cond_branch(method):
    """Upstream's sampler runs one pass per step (distilled, or true CFG batched into one call): the branch is
    named ``cond``, as the docs and the diffusers pipeline name it (every method: test_hunyuan_official.py)."""
    import stepcache
    model = HYVideoDiffusionTransformer()
    cached = stepcache.enable(model, method, profile="hunyuanvideo-t2v-544p", num_steps=6)
    cached.start_generation(6)
    x = torch.randn(1, 8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in torch.linspace(1000, 100, 6):
            x = x - 0.1 * model(x, t[None])["x"]
    stats = stepcache.stats(model)
    assert stats.branches() == ["cond"] and stats.counts()[1] == 6
    assert list(stats.to_dict()["branches"]) == ["cond"]
    stepcache.disable(model)
