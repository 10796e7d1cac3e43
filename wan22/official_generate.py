"""The implementation behind Wan2.2's ``magcache_generate.py``, ``teacache_generate.py`` and
``easycache_generate.py``: Wan2.1's (:mod:`stepcache.wan21.official_generate`) with what differs in Wan-Video/Wan2.2,
one :class:`Wan22Repo`.

* Tasks: ``t2v-A14B`` and ``i2v-A14B`` (two experts, one cache over both), ``ti2v-5B`` (one model; with and
  without ``--image``, each with its own MagCache table). ``animate-14B`` and ``s2v-14B`` run uncached.
* Flags: MagCache4Wan2.2's (``--magcache_thresh`` 0.04, ``--magcache_K`` 2, ``--retention_ratio`` 0.2) and
  EasyCache4Wan2.2's (``--thresh`` 0.05 for TI2V-5B, ``--thresh_t2v`` 0.06 for T2V-A14B, ``--ret_steps`` 7). No
  TeaCache coefficients are published for Wan2.2: ``teacache_generate.py`` needs ``--cache_profile``.
* Two published bugs are not copied: MagCache4Wan2.2's TI2V path raises a TypeError (``split_steps * 2`` with
  ``split_steps=None``), and under ``--ulysses_size > 1`` its class-level forward is shadowed by the instance
  forward Wan2.2 sets, so it never caches; here the cache sits on each model instance, beneath that forward.

Design notes: docs/wan22.md
"""
from __future__ import annotations

from typing import Any

from ..profiles import Profile, load_profile
from ..wan21.official_generate import PlanError, WanRepo, _need_file, model_config
from .official import FAMILY, attach

# The shipped table per task (TI2V-5B: one for text-to-video, one with --image).
DEFAULT_PROFILES = {"t2v": "wan2.2-t2v-a14b", "i2v": "wan2.2-i2v-a14b", "ti2v": "wan2.2-ti2v-5b",
                    "ti2v+image": "wan2.2-ti2v-5b-i2v"}
UNCACHED = ("animate", "s2v")
# MagCache4Wan2.2 magcache_generate.py _parse_args (Zehong-Ma/MagCache@df81cb18, lines 548-562).
MAGCACHE_CLI_DEFAULTS = {"thresh": 0.04, "K": 2, "retention_ratio": 0.2}
# EasyCache4Wan2.2 easycache_generate.py _parse_args (H-EmbodVis/EasyCache@3149a412): --thresh for TI2V-5B,
# --thresh_t2v for T2V-A14B, --ret_steps (steps, both).
EASYCACHE_CLI_DEFAULTS = {"thresh": 0.05, "thresh_t2v": 0.06, "ret_steps": 7}


class Wan22Repo(WanRepo):
    name = "Wan2.2"
    github = "Wan-Video/Wan2.2"
    family = FAMILY
    samplers = ("WanT2V", "WanI2V", "WanTI2V")
    savers = ("save_video",)
    saver_returns_name = False  # wan.utils.utils.save_video returns nothing either way; the file tells
    magcache_defaults = MAGCACHE_CLI_DEFAULTS
    magcache_help_extra = (" (ti2v-5B: at the start; A14B: in the profile's zones, at the start and after the "
                           "expert switch)")
    has_experts = True

    def task_kind(self, task: str) -> str:
        return task.split("-")[0]

    def runs_experts(self, task: str) -> bool:
        return self.task_kind(task) in ("t2v", "i2v")

    def profile_task(self, task: str, image: bool) -> str:
        """TI2V-5B's tables are a text-to-video one and an image-to-video one (``--image``)."""
        kind = self.task_kind(task)
        return ("i2v" if image else "t2v") if kind == "ti2v" else kind

    def in_channels(self, kind: str) -> int:
        return {"i2v": 36, "ti2v": 48}.get(kind, 16)

    def uncached_task(self, task: str) -> str | None:
        if self.task_kind(task) in UNCACHED:
            return (f"--task {task} runs a model whose extra blocks these scripts do not patch; caching and "
                    f"calibration cover t2v-A14B, i2v-A14B and ti2v-5B")
        return None

    def default_profile(self, args, upstream) -> Profile | None:
        kind = self.task_kind(args.task)
        key = "ti2v+image" if kind == "ti2v" and getattr(args, "image", None) else kind
        return load_profile(DEFAULT_PROFILES[key]) if key in DEFAULT_PROFILES else None

    def no_table(self, method: str, args) -> str:
        if method == "teacache":
            return ("no TeaCache coefficients are published for Wan2.2: fit them on your model with `stepcache "
                    "calibrate` (on its diffusers pipeline) and pass the file with --cache_profile")
        if method == "easycache":
            return (f"EasyCache4Wan2.2 publishes no setting for --task {args.task} (its script runs it uncached); "
                    f"pass a profile with an easycache table with --cache_profile")
        return super().no_table(method, args)

    def add_easycache_flags(self, group) -> None:
        d = EASYCACHE_CLI_DEFAULTS
        group.add_argument("--thresh", type=float, default=d["thresh"],
                           help=f"accumulated transformation-rate budget for ti2v-5B (default {d['thresh']})")
        group.add_argument("--thresh_t2v", type=float, default=d["thresh_t2v"],
                           help=f"the same budget for t2v-A14B (default {d['thresh_t2v']})")
        group.add_argument("--ret_steps", type=int, default=d["ret_steps"],
                           help=f"steps always computed at the start (default {d['ret_steps']})")

    def easycache_params(self, ours, args, notes: list[str]) -> dict[str, Any]:
        """The published script reads --thresh_t2v for t2v-A14B and --thresh for ti2v-5B; the other one would
        change nothing, so setting it is refused."""
        t2v = self.task_kind(args.task) == "t2v"
        used, unused = ("thresh_t2v", "thresh") if t2v else ("thresh", "thresh_t2v")
        if getattr(ours, unused) != EASYCACHE_CLI_DEFAULTS[unused]:
            raise PlanError(f"--{unused} is not read for --task {args.task} (the published script reads --{used}); "
                            f"set --{used} instead")
        return {"thresh": getattr(ours, used), "warmup_steps": ours.ret_steps}

    def check_inputs(self, args) -> None:
        kind = self.task_kind(args.task)
        if kind == "i2v":
            _need_file(args, "image", f"--task {args.task} needs --image PATH (the first frame of the video)")
        elif kind == "ti2v" and getattr(args, "image", None):
            _need_file(args, "image", "")

    def uses_clip(self, task: str) -> bool:
        return False  # Wan2.2's I2V-A14B conditions on the image latent alone

    def dit_folders(self, args, cfg) -> list[str]:
        """A14B: the low-noise expert's folder, then the high-noise one's (the order upstream loads them)."""
        if getattr(cfg, "low_noise_checkpoint", None):
            return [cfg.low_noise_checkpoint, cfg.high_noise_checkpoint]
        return [""]

    def attach(self, sampler, plan):
        return attach(sampler, plan.method, plan.profile, plan.params, calibrate=plan.calibrate,
                      storage=plan.storage)

    def calibrated_model(self, args, kind: str, height: int, width: int, attachment) -> dict[str, Any]:
        model = {"family": self.family, "task": self.profile_task(args.task, bool(args.image)),
                 "resolution": [height, width], "config": model_config(attachment.model),
                 "classes": ["WanTransformer3DModel", "WanModel"]}
        if attachment.generations[-1].switch_step is not None:
            model["experts"] = self.experts_of_run(args)
        return model

    def experts_of_run(self, args) -> dict[str, Any]:
        """``model.experts`` for a table calibrated on a two-expert task: the task's shipped boundary data at this
        run's steps, shift and solver's sigma range (the schema recomputes the switch step from them)."""
        from ..policies import expert_switch_step
        shipped = load_profile(DEFAULT_PROFILES[self.task_kind(args.task)]).experts
        experts = {**shipped, "shift": float(args.sample_shift), "steps": int(args.sample_steps),
                   # dpm++'s sigmas start at 1 (wan/utils/fm_solvers.py get_sampling_sigmas), unipc's at 1 - 1/1000
                   "sigma_max": 1.0 if args.sample_solver == "dpm++" else shipped["sigma_max"],
                   "source": f"calibrated run ({args.sample_solver}, shift {args.sample_shift}); {shipped['source']}"}
        experts["switch_step"] = expert_switch_step(experts["steps"], experts["boundary"], experts["shift"],
                                                    int(experts["num_train_timesteps"]), experts["sigma_max"],
                                                    experts["sigma_min"])
        return experts

    def check_calibration(self, args, upstream) -> None:
        """Before anything loads: the expert data a calibrated A14B table will state must give the switch the
        run's own scheduler makes, else the file could not be used."""
        if not self.runs_experts(args.task):
            return
        import inspect

        from .official import switch_step_for
        cfg = upstream.WAN_CONFIGS[args.task]
        sampler = inspect.unwrap(getattr(upstream.wan, "WanT2V" if self.task_kind(args.task) == "t2v" else "WanI2V"))
        if not hasattr(getattr(sampler, "generate", None), "__globals__"):
            return  # not upstream's class (a stand-in): its scheduler cannot be asked
        actual = switch_step_for(sampler, cfg.num_train_timesteps, cfg.boundary, int(args.sample_steps),
                                 float(args.sample_shift), args.sample_solver)
        stated = self.experts_of_run(args)["switch_step"]
        if actual != stated:
            raise PlanError(f"--sample_solver {args.sample_solver} with --sample_steps {args.sample_steps} and "
                            f"--sample_shift {args.sample_shift} switches experts at step {actual}, where the "
                            f"boundary data a calibrated table records give {stated}; calibrate with another step "
                            f"count or --sample_solver unipc")


WAN22 = Wan22Repo()


def run_script(method: str) -> None:
    """Entry point of the Wan2.2 drop-in scripts."""
    from ..wan21.official_generate import run_script as run
    run(method, WAN22)
