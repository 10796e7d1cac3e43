"""Host synchronisations stepcache itself makes per pass (a GPU waits for each): MagCache decides from its table
alone (none); TeaCache and EasyCache read one scalar per pass. Counted with a TorchFunctionMode over every
Tensor -> host conversion whose caller is stepcache's own code (the pipeline's and the model's are theirs)."""
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import stepcache
from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load

pytest.importorskip("diffusers")

HOST = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
import stepcache.hunyuan  # noqa: E402
import stepcache.hunyuan15  # noqa: E402
import stepcache.opensora  # noqa: E402
import stepcache.wan21  # noqa: E402
import stepcache.wan22  # noqa: E402

# stepcache's own code: the core and the family adapters; the demo model's pipeline driver is the caller's side
OWN = [Path(m.__file__).parent for m in (stepcache, stepcache.wan21, stepcache.wan22, stepcache.hunyuan,
                                         stepcache.hunyuan15, stepcache.opensora)]
DEMO = Path(stepcache.wan21.demo.__file__).parent


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.where: list[tuple[str, str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST:
            caller = next((f for f in reversed(traceback.extract_stack()[:-1])
                           if "torch/overrides" not in f.filename), None)
            path = Path(caller.filename) if caller else None
            ours = path is not None and any(d in path.parents for d in OWN) and DEMO not in path.parents
            if ours:
                self.where.append((func.__name__, caller.filename, caller.lineno))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,per_pass", [("magcache", 0), ("teacache", 1), ("easycache", 1)])
def test_host_reads_per_pass(method, per_pass):
    torch.set_num_threads(1)
    demo = DemoPipeline(load())
    stepcache.enable(demo.pipe, method, profile=str(PROFILE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo.latents(["a red square moving right on a dark background"], [1], steps=30)
        reads = HostReads()
        with reads:
            demo.latents(["a red square moving right on a dark background"], [1], steps=30)
    computed, total = stepcache.stats(demo.pipe).counts(stepcache.stats(demo.pipe).generation_ids()[-1])
    stepcache.disable(demo.pipe)
    assert computed < total                                   # it cached: the reads are a caching run's
    assert len(reads.where) <= per_pass * total + 1, reads.where[:5]


@pytest.mark.parametrize("method,per_pass", [("magcache", 0), ("teacache", 1), ("easycache", 1)])
def test_open_sora_reads_no_timestep_per_pass(method, per_pass):
    """Open-Sora's generations come from the sampler's timestep list, and its clock counts passes: no timestep is
    read (before: two reads per pass, one by the generation tracker and one by the clock)."""
    from opensora_tiny import STDiT3, model_args, sample
    torch.set_num_threads(1)
    model = STDiT3().eval()
    stepcache.enable(model, method, profile="opensora-1.2")
    z = torch.randn(1, model.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reads = HostReads()
        with reads:
            sample(model, z, model_args())
    computed, total = stepcache.stats(model).counts()
    stepcache.disable(model)
    assert total == 30 and computed < total
    assert len(reads.where) <= per_pass * total + 1, reads.where[:5]


@pytest.mark.parametrize("marked, per_pass", [(False, 1), (True, 0)])
def test_a_driver_that_marks_its_generations_reads_no_timestep(marked, per_pass):
    """A bare transformer in a loop that tells stepcache nothing but the branch (no step index, no scheduler): the
    clock counts passes and reads each pass's timestep to notice a new generation; an entry point that marks every
    generation itself (the official-repo drivers, through start_generation) spares that read: MagCache then reads
    nothing at all."""
    from wan_tiny import build_t2v
    torch.set_num_threads(1)
    transformer = build_t2v().transformer
    steps = 10
    cached = stepcache.enable(transformer, "magcache", profile="wan2.1-t2v-1.3b", num_steps=steps, thresh=0.5)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if marked:
            cached.start_generation(steps)
        reads = HostReads()
        with reads:
            for t in torch.linspace(999, 1, steps):
                with transformer.cache_context("cond"):
                    x = x - 0.05 * transformer(x, timestep=t.expand(1), encoder_hidden_states=text,
                                               return_dict=False)[0]
    computed, total = stepcache.stats(transformer).counts()
    stepcache.disable(transformer)
    assert total == steps and computed < total
    assert len(reads.where) == per_pass * total, reads.where[:3]
