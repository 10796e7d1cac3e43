"""Train the demo model on CPU: ``python -m stepcache.wan21.demo.train --out DIR [--steps N] [--resume]``.

What it trains: a ``diffusers.WanTransformer3DModel`` (config in :mod:`.model`) with the rectified-flow objective
Wan uses (``x_t = (1 - t) x0 + t noise``, target ``noise - x0``, timestep ``1000 t``) on procedurally generated
clips (:mod:`.scenes`) in the fixed linear latent (:mod:`.codec`), conditioned on the prompt through the
word-embedding encoder (:mod:`.text`, trained jointly), with the prompt replaced by the empty prompt 10 % of
the time so that classifier-free guidance works.

Reproducible and resumable exactly: everything random in step ``k`` (the clips, the dropped prompts, the
timesteps, the noise) comes from a generator seeded with ``(seed, k)``, and the checkpoint
(``DIR/checkpoint.pt``, written atomically every ``--checkpoint-every`` seconds and at the end) holds the model,
its EMA, the optimizer and the step, so ``--resume`` continues bit for bit as if never stopped (at the same
thread count). ``DIR/loss.csv`` logs the loss. At the end it writes ``DIR/demo_wan.safetensors`` (the EMA
weights in float16: what ships as ``stepcache/wan21/demo/weights/demo_wan.safetensors``) and runs the
prompt-match check on held-out prompt-seed pairs. ``--export`` only exports the latest checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from ...cliargs import OneLineParser, int_at_least
from ...errors import InputError, run_cli
from . import codec as codec_mod
from .model import TRANSFORMER_CONFIG, build_transformer, save_weights
from .scenes import make_batch
from .text import MAX_TOKENS, WordEncoder, WordTokenizer

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.csv"
EXPORT = "demo_wan.safetensors"
# Hyper-parameters that define a run; stored in the checkpoint, and a resumed run keeps them.
DEFAULTS = dict(seed=0, steps=10000, batch=24, lr=1e-3, min_lr_frac=0.05, warmup=200, weight_decay=0.01,
                betas=(0.9, 0.99), clip=1.0, ema=0.999, cfg_drop=0.1, t_shift=2.0, t_uniform=0.25,
                codec_clips=1024, clock="txy", init=None, t_max=1.0, train_text=True)
# init: a demo weight file to start from (its transformer, prompt encoder and codec) instead of random weights;
# t_max: timesteps are drawn below it only (t_max=0.875: a low-noise expert, stepcache.wan22.demo); train_text:
# False keeps the prompt encoder of init fixed (two experts of one pipeline share it).
# Runs started before the clock existed have no "clock" key and keep the codec they were trained with (none);
# clock=True is the frame clock alone.


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


def lr_at(step: int, h: dict) -> float:
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    progress = min(1.0, (step - h["warmup"]) / max(1, h["steps"] - h["warmup"]))
    return h["lr"] * (h["min_lr_frac"] + (1 - h["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_t(n: int, h: dict, g: torch.Generator) -> torch.Tensor:
    """Logit-normal(0, 1) timesteps, a quarter of them uniform instead, then warped by ``t_shift`` towards noise."""
    u = torch.sigmoid(torch.randn(n, generator=g))
    uniform = torch.rand(n, generator=g)
    u = torch.where(torch.rand(n, generator=g) < h["t_uniform"], uniform, u)
    s = h["t_shift"]
    return h.get("t_max", 1.0) * (s * u / (1 + (s - 1) * u))


class Trainer:
    def __init__(self, h: dict):
        self.h = h
        torch.manual_seed(h["seed"])
        self.tokenizer = WordTokenizer()
        self.model = build_transformer(TRANSFORMER_CONFIG, seed=h["seed"])
        torch.manual_seed(h["seed"] + 1)
        self.text = WordEncoder(len(self.tokenizer))
        if h.get("init"):  # fine-tune a trained demo model: its weights, prompt encoder and codec
            from .model import load
            start = load(h["init"])
            self.model.load_state_dict(start.transformer.state_dict())
            self.text.load_state_dict(start.text_encoder.state_dict())
            self.codec = start.codec
        else:
            self.codec = codec_mod.fit(make_batch(h["codec_clips"], torch.Generator().manual_seed(h["seed"] + 7))[1],
                                       clock=h.get("clock", False))
        self.ema_model = build_transformer(TRANSFORMER_CONFIG)
        self.ema_model.load_state_dict(self.model.state_dict())
        self.ema_text = WordEncoder(len(self.tokenizer))
        self.ema_text.load_state_dict(self.text.state_dict())
        for m in (self.ema_model, self.ema_text):
            m.requires_grad_(False)
        self.text.requires_grad_(h.get("train_text", True))
        params = list(self.model.parameters()) + (list(self.text.parameters()) if h.get("train_text", True) else [])
        self.opt = torch.optim.AdamW(params, lr=h["lr"], betas=tuple(h["betas"]), weight_decay=h["weight_decay"])
        self.step = 0

    # --- one optimisation step ------------------------------------------------------------------------------
    def batch(self, step: int):
        g = step_generator(self.h["seed"], step)
        scenes, clips = make_batch(self.h["batch"], g)
        x0 = self.codec.encode(clips)
        drop = torch.rand(len(scenes), generator=g) < self.h["cfg_drop"]
        prompts = ["" if d else s.prompt for s, d in zip(scenes, drop.tolist())]
        t = sample_t(len(scenes), self.h, g)
        noise = torch.randn(x0.shape, generator=g)
        return prompts, x0, t, noise

    def train_step(self) -> float:
        h = self.h
        prompts, x0, t, noise = self.batch(self.step)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        self.model.train()
        with torch.set_grad_enabled(h.get("train_text", True)):
            cond = self.text.encode(self.tokenizer, prompts, MAX_TOKENS)
        pred = self.model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        lr = lr_at(self.step, h)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g_ in self.opt.param_groups for p in g_["params"]], h["clip"])
        self.opt.step()
        decay = min(h["ema"], (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for ema, live in ((self.ema_model, self.model), (self.ema_text, self.text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        self.step += 1
        return float(loss.detach())

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "hparams": self.h, "model": self.model.state_dict(),
                "text": self.text.state_dict(), "ema_model": self.ema_model.state_dict(),
                "ema_text": self.ema_text.state_dict(), "opt": self.opt.state_dict(),
                "codec": self.codec.state_dict(), "torch_rng": torch.get_rng_state(),
                "threads": torch.get_num_threads(), "versions": {"torch": str(torch.__version__)}}

    def save(self, out: Path) -> None:
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, out / CHECKPOINT)

    def load(self, out: Path) -> None:
        ck = load_checkpoint(out)
        self.model.load_state_dict(ck["model"])
        self.text.load_state_dict(ck["text"])
        self.ema_model.load_state_dict(ck["ema_model"])
        self.ema_text.load_state_dict(ck["ema_text"])
        self.opt.load_state_dict(ck["opt"])
        self.codec = codec_mod.LinearCodec.from_state_dict(ck["codec"])
        torch.set_rng_state(ck["torch_rng"])
        self.step = ck["step"]
        if ck.get("threads") != torch.get_num_threads():
            print(f"warning: checkpoint was written with {ck.get('threads')} threads, now "
                  f"{torch.get_num_threads()}: the continuation is valid but not bit-identical", file=sys.stderr)

    def export(self, path: Path) -> Path:
        info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.h.items()}
        info["trained_steps"] = self.step
        return save_weights(path, self.ema_model, self.ema_text, self.codec, info)


class CheckpointError(InputError):
    """A checkpoint that holds more than tensors and plain containers, or is no checkpoint at all."""


def load_checkpoint(out: Path) -> dict:
    """The checkpoint in ``out``, loaded with ``weights_only=True``: tensors, numbers, strings and plain
    containers only (everything :meth:`Trainer.state` writes), so a crafted file cannot run code when loaded."""
    import pickle
    path = Path(out) / CHECKPOINT
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refusing to load {path}: it is not a checkpoint of tensors and plain containers "
                              f"({first})") from None


def read_hparams(out: Path) -> dict:
    return load_checkpoint(out)["hparams"]


def truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = list(csv.reader(path.open()))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(keep)


def train(out, steps: int | None = None, resume: bool = False, checkpoint_every: float = 300.0,
          threads: int = 1, progress: bool = True, check: int = 0, stop_at: int | None = None,
          max_minutes: float | None = None, **overrides) -> Trainer:
    """Run (or continue) a training run in ``out``. ``stop_at``/``max_minutes`` end this sitting early with a
    checkpoint (continue later with ``resume=True``); the export and the check run only when the run is done."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / CHECKPOINT).exists():
        h = read_hparams(out)
        if steps is not None and steps != h["steps"]:
            raise InputError(f"{out / CHECKPOINT} is a run of {h['steps']} steps; resume it without --steps, "
                             f"or pass --steps {h['steps']} (the learning-rate schedule depends on it)")
        trainer = Trainer(h)
        trainer.load(out)
    else:
        if (out / CHECKPOINT).exists() and not resume:
            raise InputError(f"{out / CHECKPOINT} exists: pass --resume to continue it, or choose another --out")
        h = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
        if steps is not None:
            h["steps"] = steps
        trainer = Trainer(h)
        (out / "hparams.json").write_text(json.dumps(h, indent=1))
    log_path = out / LOSS_LOG
    truncate_log(log_path, trainer.step)
    new_log = not log_path.exists()
    from tqdm import tqdm
    bar = tqdm(total=h["steps"], initial=trainer.step, desc="training demo model", unit="step",
               disable=not progress, dynamic_ncols=True)
    last_save = time.monotonic()
    run_start, first_step = time.monotonic(), trainer.step
    with log_path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["step", "loss", "lr", "seconds_per_step"])
        window: list[float] = []
        tick = time.monotonic()
        end = min(h["steps"], stop_at) if stop_at is not None else h["steps"]
        deadline = run_start + 60 * max_minutes if max_minutes else None
        while trainer.step < end and (deadline is None or time.monotonic() < deadline):
            loss = trainer.train_step()
            now = time.monotonic()
            window.append(loss)
            writer.writerow([trainer.step, f"{loss:.5f}", f"{lr_at(trainer.step - 1, h):.6g}", f"{now - tick:.3f}"])
            tick = now
            bar.update(1)
            if trainer.step % 10 == 0:
                bar.set_postfix(loss=f"{sum(window[-50:]) / len(window[-50:]):.4f}")
                window = window[-50:]
            if now - last_save >= checkpoint_every:
                f.flush()
                trainer.save(out)
                last_save = time.monotonic()
    bar.close()
    trainer.save(out)
    done = trainer.step - first_step
    if done:
        print(f"{done} steps in {time.monotonic() - run_start:.0f} s "
              f"({(time.monotonic() - run_start) / done:.3f} s/step); checkpoint {out / CHECKPOINT}")
    if trainer.step < h["steps"]:
        print(f"stopped at step {trainer.step} of {h['steps']}; continue with --resume")
        return trainer
    path = trainer.export(out / EXPORT)
    print(f"exported the EMA weights ({path.stat().st_size / 1e6:.2f} MB) to {path}")
    if check:
        from .check import prompt_match
        prompt_match(path, n=check, progress=progress)
    return trainer


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.wan21.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, loss.csv, demo_wan.safetensors")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help=f"total optimisation steps (default {DEFAULTS['steps']})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--batch", type=int_at_least(1), default=None, help=f"clips per step (default {DEFAULTS['batch']})")
    p.add_argument("--seed", type=int, default=None, help="seed of the run (default 0)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--warmup", type=int_at_least(0), default=None,
                   help=f"learning-rate warm-up steps (default {DEFAULTS['warmup']})")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from this demo weight file (a .safetensors written by this script) instead of random "
                        "weights: its transformer, prompt encoder and codec")
    p.add_argument("--t-max", dest="t_max", type=float, default=None,
                   help="draw training timesteps below this fraction of the noise range only (default 1; 0.875 "
                        "trains a low-noise expert)")
    p.add_argument("--freeze-text", action="store_true",
                   help="keep the prompt encoder of --init fixed (experts of one pipeline share it)")
    p.add_argument("--threads", type=int_at_least(1), default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine one thread was 2.5x faster than two)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--check", type=int, default=240,
                   help="held-out prompt-seed pairs for the prompt-match check at the end (0: skip)")
    p.add_argument("--export", action="store_true",
                   help="only export DIR/demo_wan.safetensors from the latest checkpoint (and run the check)")
    p.add_argument("--stop-at", type=int, default=None, help="end this sitting at this step (checkpointed)")
    p.add_argument("--max-minutes", type=float, default=None, help="end this sitting after this many minutes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return run_cli(lambda: _main(a), prog="python -m stepcache.wan21.demo.train")


def _init_path(init: str | None) -> str | None:
    """--init checked before anything runs: an existing demo weight file ("demo": the shipped one)."""
    if init is None:
        return None
    if init == "demo":
        from .model import WEIGHTS
        return str(WEIGHTS)
    if not Path(init).is_file():
        raise InputError(f"--init {init!r} does not exist; give a demo weight file (.safetensors) or 'demo'")
    return str(Path(init).resolve())


def _main(a: argparse.Namespace) -> int:
    if a.t_max is not None and not 0 < a.t_max <= 1:
        raise InputError(f"--t-max {a.t_max} is outside (0, 1]")
    if a.export:
        torch.set_num_threads(a.threads)
        out = Path(a.out)
        trainer = Trainer(read_hparams(out))
        trainer.load(out)
        path = trainer.export(out / EXPORT)
        print(f"exported step {trainer.step} to {path}")
        if a.check:
            from .check import prompt_match
            prompt_match(path, n=a.check, progress=not a.no_progress)
        return 0
    train(a.out, steps=a.steps, resume=a.resume, checkpoint_every=a.checkpoint_every, threads=a.threads,
          progress=not a.no_progress, check=a.check, stop_at=a.stop_at, max_minutes=a.max_minutes, batch=a.batch,
          seed=a.seed, lr=a.lr, warmup=a.warmup, init=_init_path(a.init), t_max=a.t_max,
          train_text=False if a.freeze_text else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
