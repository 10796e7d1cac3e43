"""LPIPS: parity with the `lpips` package on the same (random) backbone, and the offline weight search.

The parity tests need `lpips` installed without its dependencies (it would pull torchvision and a CUDA torch):
    pip install --no-deps lpips==0.1.4
They skip with that reason otherwise. torchvision is replaced by a stub in sys.modules for the duration of a
test: upstream lpips only reads `.features` from the torchvision network it builds, and `pnet_rand=True` keeps
it from asking for pretrained weights.
"""
import importlib.util
import sys
import types

import pytest
import torch
from eval_videos import random_lpips_files

from stepcache.eval import lpips as ours
from stepcache.eval.errors import CompareError

LPIPS_INSTALLED = importlib.util.find_spec("lpips") is not None
needs_lpips = pytest.mark.skipif(not LPIPS_INSTALLED, reason="the `lpips` package is not installed; CI runs this "
                                 "test after `pip install --no-deps lpips==0.1.4`")


@pytest.fixture
def upstream_lpips(monkeypatch):
    """The upstream `lpips` module, imported beside a stub torchvision whose networks are this project's."""
    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    class _Net:
        def __init__(self, net):
            self.features = ours.backbone_features(net)

    models.alexnet = lambda pretrained=False, **_: _Net("alex")
    models.vgg16 = lambda pretrained=False, **_: _Net("vgg")
    models.squeezenet1_1 = lambda pretrained=False, **_: None
    torchvision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips

    yield lpips
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)


def _save_upstream_backbone(reference, net, path):
    """Upstream's random backbone (slice1.0.weight, ...) saved in torchvision's layout (features.0.weight, ...)."""
    by_index = {k.split(".", 1)[1]: v for k, v in reference.net.state_dict().items()}
    torch.save({f"features.{k}": by_index[k] for k in ours.backbone_features(net).state_dict()}, path)
    return path


@needs_lpips
@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.parametrize("spatial", [True, False])
def test_matches_upstream_lpips_on_the_same_backbone(upstream_lpips, net, spatial, tmp_path):
    torch.manual_seed(0)
    reference = upstream_lpips.LPIPS(net=net, pnet_rand=True, spatial=spatial, verbose=False).eval()
    backbone = _save_upstream_backbone(reference, net, tmp_path / ours.BACKBONE_FILES[net])
    heads = ours.find_heads(net)  # upstream loaded the same packaged heads into `reference`
    mine = ours.LPIPS(net, ours.load_backbone_state(backbone, net), ours.load_head_state(heads, net),
                      spatial_mean=spatial)
    a = torch.rand(3, 3, 64, 96) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(a, b).mean((1, 2, 3))
    torch.testing.assert_close(mine(a, b), expected, rtol=1e-6, atol=1e-8)
    assert mine(a, a).abs().max().item() == 0.0


@needs_lpips
def test_prefers_upstream_lpips_where_it_imports_and_finds_its_backbone(upstream_lpips, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(ours.BACKBONE_ENV, raising=False)
    random_lpips_files(tmp_path / "hub" / "checkpoints")
    setup = ours.load_lpips("alex")
    assert setup.available and setup.description["implementation"].startswith("lpips")
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    assert setup.scorer(x, x).tolist() == [0.0, 0.0]


def test_heads_are_found_without_importing_their_package(monkeypatch):
    packages = ("lpips", "torchmetrics")
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        monkeypatch.delitem(sys.modules, name)
    heads = ours.find_heads("alex")
    if heads is None:
        pytest.skip("neither torchmetrics nor lpips is installed: `pip install torchmetrics`")
    assert heads.name == "alex.pth" and heads.stat().st_size < 10_000
    assert set(ours.load_head_state(heads, "alex")) >= {f"lin{i}.model.1.weight" for i in range(5)}
    # Importing lpips would need torchvision: find_spec must only have located the files.
    assert not [m for m in sys.modules if m.split(".")[0] in packages]


def test_backbone_found_in_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(ours.BACKBONE_ENV, raising=False)
    monkeypatch.setattr(ours, "_upstream_lpips", lambda net, device: None)  # this test is about our own module
    _, heads = random_lpips_files(tmp_path / "hub" / "checkpoints")
    setup = ours.load_lpips("alex", heads=heads)
    assert setup.available
    assert setup.description["backbone"] == str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")


def test_backbone_from_environment_variable(tmp_path, monkeypatch):
    backbone, heads = random_lpips_files(tmp_path)
    monkeypatch.setenv(ours.BACKBONE_ENV, str(backbone))
    setup = ours.load_lpips("alex", heads=heads)
    assert setup.available and setup.description["backbone_source"] == f"${ours.BACKBONE_ENV}"


def test_missing_backbone_is_reported_with_file_name_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv(ours.BACKBONE_ENV, raising=False)
    setup = ours.load_lpips("alex")
    assert not setup.available
    reason = setup.description["reason"]
    assert "alexnet-owt-7be5be79.pth" in reason
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in reason
    assert "--lpips-weights" in reason


def test_missing_heads_are_reported(tmp_path, monkeypatch):
    backbone, _ = random_lpips_files(tmp_path)
    monkeypatch.setattr(ours, "HEAD_LOCATIONS", (("no_such_package_xyz", "{net}.pth"),))
    setup = ours.load_lpips("alex", weights=backbone)
    assert not setup.available
    assert "head file (alex.pth" in setup.description["reason"] and "torchmetrics" in setup.description["reason"]


def test_explicit_paths_must_exist_and_be_the_right_file(tmp_path):
    with pytest.raises(CompareError, match="--lpips-weights .*nope.pth: no such file"):
        ours.load_lpips("alex", weights=tmp_path / "nope.pth")
    _, heads = random_lpips_files(tmp_path, net="alex")
    vgg_backbone, _ = random_lpips_files(tmp_path / "vgg", net="vgg")
    with pytest.raises(CompareError, match="not a torchvision alex checkpoint"):
        ours.load_lpips("alex", weights=vgg_backbone, heads=heads)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CompareError, match="cannot load LPIPS backbone"):
        ours.load_lpips("alex", weights=tmp_path / "junk.pth", heads=heads)


def test_identical_inputs_give_zero_and_different_ones_do_not(tmp_path):
    setup = ours.load_lpips("alex", *random_lpips_files(tmp_path))
    a = torch.rand(2, 3, 64, 96) * 2 - 1
    assert setup.scorer(a, a).tolist() == [0.0, 0.0]
    assert (setup.scorer(a, a.flip(-1)) > 0).all()
