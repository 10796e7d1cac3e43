"""Upstream Wan2.1's parallel wrappings: ``--dit_fsdp`` (FSDP around the WanModel and each block) and USP
(an instance-level ``forward`` bound on the model). The published scripts patch ``model.__class__``: under FSDP
that is ``FullyShardedDataParallel`` itself (a TypeError at the first block), under USP the instance forward
shadows it (silently uncached). Here FSDP runs on a 1-process gloo group set up through a FileStore (no
network).
"""
import types
from functools import partial

import pytest
import torch

from helpers import BlockWork, wan21_checkout
from wan_official_tiny import bare_sampler, run_t2v, tiny_model, up  # up: the fixture of upstream on the CPU

wan21_checkout()  # the whole module needs the checkout

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy  # noqa: E402

from stepcache.runner import NothingCachedWarning  # noqa: E402
from stepcache.wan21.official import attach, unwrap  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning"),
              pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning")]
PROFILE = "wan2.1-t2v-1.3b"
FSDP_FORWARD = FSDP.__dict__["forward"]
MAGCACHE = {"thresh": 0.24, "K": 4, "retention_ratio": 0.2}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this test process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fsdp_sampler(up):
    """What upstream's shard_model does for --dit_fsdp (FSDP around the model, each block its own unit), on CPU
    and in fp32 so that outputs can be compared bit for bit."""
    model = tiny_model(up, "t2v")
    blocks = list(model.blocks)
    wrapped = FSDP(model, auto_wrap_policy=partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in blocks),
                   device_id=torch.device("cpu"), sync_module_states=False)
    return bare_sampler(up, "t2v", wrapped)


@pytest.fixture(scope="module")
def baseline(up):
    return run_t2v(bare_sampler(up, "t2v", tiny_model(up, "t2v")), steps=8)


def test_fsdp_wrapped_model_is_cached_on_the_inner_instance(up, group, baseline):
    sampler = fsdp_sampler(up)
    assert isinstance(sampler.model, FSDP) and isinstance(sampler.model.module.blocks[0], FSDP)
    assert torch.equal(run_t2v(sampler, steps=8), baseline)

    zero = attach(sampler, "magcache", PROFILE, {**MAGCACHE, "thresh": 0.0})
    assert zero.model is unwrap(sampler.model) and "forward" not in sampler.model.__dict__
    with pytest.warns(NothingCachedWarning):
        assert torch.equal(run_t2v(sampler, steps=8), baseline)
    zero.remove()

    work = BlockWork(sampler.model.module)
    cached = attach(sampler, "magcache", PROFILE, MAGCACHE)
    out = run_t2v(sampler, steps=8)
    computed, total = cached.cached.stats.counts()
    assert total == 16 and 0 < computed < total and work.passes == computed
    assert torch.isfinite(out).all()
    assert FSDP.__dict__["forward"] is FSDP_FORWARD and "forward" not in sampler.model.__dict__


def test_published_class_patch_breaks_under_fsdp(up, group, monkeypatch):
    """What the published scripts do (``wan_t2v.model.__class__.forward = magcache_forward``) replaces FSDP's
    forward for every FSDP unit, so the first wrapped block is called with the DiT's signature."""
    sampler = fsdp_sampler(up)

    def published_style_forward(self, x, t, context, seq_len, clip_fea=None, y=None):
        tokens = torch.zeros(1, seq_len, self.dim)
        return [self.blocks[0](tokens, e=None, seq_lens=None, grid_sizes=None, freqs=None, context=None,
                               context_lens=None)]

    monkeypatch.setattr(type(sampler.model), "forward", published_style_forward)
    with pytest.raises(TypeError, match="published_style_forward.. got an unexpected keyword argument 'e'"):
        run_t2v(sampler, steps=2)


def test_instance_level_usp_forward_is_wrapped_not_shadowing(up, baseline):
    """Upstream's USP binds ``model.forward = types.MethodType(usp_dit_forward, model)`` before the cache is
    installed; the cache must wrap that forward, not be shadowed by it."""
    sampler = bare_sampler(up, "t2v", tiny_model(up, "t2v"))
    model = sampler.model
    calls = []

    def usp_like_forward(self, *args, **kwargs):
        calls.append(1)
        return type(self).forward(self, *args, **kwargs)

    model.forward = types.MethodType(usp_like_forward, model)
    work = BlockWork(model)
    cached = attach(sampler, "magcache", PROFILE, MAGCACHE)
    out = run_t2v(sampler, steps=8)
    computed, total = cached.cached.stats.counts()
    assert total == 16 and 0 < computed < total and work.passes == computed
    assert len(calls) == 16  # the USP forward still runs every pass, inside the cache
    cached.remove()
    assert model.forward.__func__ is usp_like_forward  # restored exactly
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
