"""The fork's own ``OpenSoraPipeline.generate()`` (text preprocessing, multi-resolution info, RFlow, VAE call,
uint8 video, ``save_video``) on CPU with a tiny STDiT3, driven by ``stepcache.opensora.generate_set``. Run in a
subprocess by test_opensora_fork.py, so that the single-process gloo group it needs and the stand-ins below never
reach the test session:

    python opensora_fork_pipeline.py REPO -- GENERATE_SET_ARGS... [-- GENERATE_SET_ARGS...]

Stand-ins, besides opensora_fork.py's (none changes the transformer, the sampler or the pipeline's code):

* torchvision (only ``data_process.py`` imports it, for reference-image helpers text-to-video never calls) is a
  placeholder module while ``pipeline_open_sora`` imports;
* the T5 encoder and its tokenizer are small deterministic fakes, and the VAE is helpers.StubVAE, all with the
  interfaces the pipeline calls (a checkpoint-free run); the tokenizer pads to the pipeline's hard-coded 300
  tokens, so the tiny model's ``model_max_length`` is 300;
* ``STDiT3.enable_parallel`` (which builds colossalai's process-group mesh) is replaced on the instance by the
  single-process manager of opensora_fork.py, which is what it would compute for one process, or on several by
  :func:`sequence_parallel_manager`, the groups it would compute for the engine's setup.
"""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opensora_fork  # noqa: E402
from helpers import StubVAE  # noqa: E402

CAPTION_CHANNELS = 32


class FakeTokenizer:
    def __call__(self, texts, max_length=300, **kwargs):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            codes = [ord(c) % 997 + 1 for c in text][: max_length]
            ids[i, : len(codes)] = torch.tensor(codes)
            mask[i, : max(len(codes), 1)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class _Device(nn.Module):
    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype


class FakeT5(_Device):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(1000, CAPTION_CHANNELS)

    def forward(self, input_ids, attention_mask=None):
        return {"last_hidden_state": self.embed(input_ids)}


def pipeline_module(repo: str):
    """The fork's ``pipeline_open_sora`` module (OpenSoraConfig, OpenSoraPipeline), imported with placeholders."""
    opensora_fork.load(repo)
    import diffusers.pipelines.pipeline_utils  # noqa: F401  (before the torchvision placeholder exists)
    import transformers  # noqa: F401

    placeholder = {name: opensora_fork._module(name) for name in
                   ("torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.datasets.folder",
                    "torchvision.io", "torchvision.utils")}
    placeholder["torchvision.datasets.folder"].IMG_EXTENSIONS = (".jpg", ".png")
    placeholder["torchvision.datasets.folder"].pil_loader = None
    placeholder["torchvision.io"].write_video = None
    placeholder["torchvision.utils"].save_image = None
    with opensora_fork._import_stand_ins(placeholder):
        from videosys.pipelines.open_sora import pipeline_open_sora
    return pipeline_open_sora


def sequence_parallel_manager(dp_size: int, sp_size: int, enable_cp: bool):
    """What the fork's ``ParallelManager(dp, cp, sp)`` (a colossalai ``ProcessGroupMesh``) holds when every rank of
    the world shares one sequence, as ``OpenSoraPipeline._set_parallel()`` sets it up (dp 1, no CFG parallelism):
    the sequence-parallel group is all the ranks."""
    import types
    if dp_size != 1 or enable_cp:
        raise NotImplementedError("the stand-in manager covers the engine's setup only: dp_size 1, no CFG parallel")
    group = dist.new_group(list(range(sp_size)))  # on every rank, as the mesh creates its groups
    return types.SimpleNamespace(dp_size=1, dp_group=None, dp_rank=0, cp_size=1, cp_group=None, cp_rank=None,
                                 sp_size=sp_size, sp_group=group, sp_rank=dist.get_rank(group))


def build_pipeline(repo: str, steps: int = 30, config=None, vae=None):
    """The fork's OpenSoraPipeline around a tiny STDiT3 (seed 0), fake T5 and ``vae`` (default StubVAE); ``config`` an
    OpenSoraConfig (its steps and cfg scale; default: the published ones at ``steps``)."""
    transformer_module, scheduler_module = opensora_fork.load(repo)
    fork_pipeline = pipeline_module(repo)
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    tiny = dict(opensora_fork.TINY, model_max_length=300)
    torch.manual_seed(0)
    model = transformer_module.STDiT3(transformer_module.STDiT3Config(**tiny)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)

    def enable_parallel(dp_size, sp_size, enable_cp):
        manager = opensora_fork.single_process_manager() if sp_size == 1 else \
            sequence_parallel_manager(dp_size, sp_size, enable_cp)
        for module in model.modules():
            if hasattr(module, "parallel_manager"):
                module.parallel_manager = manager

    model.enable_parallel = enable_parallel
    config = config or fork_pipeline.OpenSoraConfig(num_sampling_steps=steps)
    scheduler = scheduler_module.RFLOW(use_timestep_transform=True, num_sampling_steps=config.num_sampling_steps,
                                       cfg_scale=config.cfg_scale)
    return fork_pipeline.OpenSoraPipeline(config, text_encoder=FakeT5(), tokenizer=FakeTokenizer(),
                                          vae=vae or StubVAE(4),
                                          transformer=model, scheduler=scheduler, device=torch.device("cpu"),
                                          dtype=torch.float32)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    repo, runs = argv[0], []
    for item in argv[1:]:
        if item == "--":
            runs.append([])
        else:
            runs[-1].append(item)
    from stepcache.opensora.generate_set import main as generate_set

    pipeline = build_pipeline(repo)
    codes = [generate_set(run, engine_factory=lambda args: pipeline) for run in runs]
    print("exit codes:", codes)
    dist.destroy_process_group()
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
