"""`pip install .` (not only the editable install CI uses) gives the one `stepcache` import name with its data."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_regular_install_imports_from_outside_the_repo(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "bin"))) == ["stepcache"]
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    # -S skips .pth files, so the editable install's import hook cannot answer for `stepcache`.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site_packages])}
    code = ("import stepcache, stepcache.wan21, stepcache.hunyuan, stepcache.opensora, stepcache.eval;"
            "from stepcache.profiles import load_profile;"
            "print(stepcache.__file__); print(len(load_profile('hunyuanvideo-t2v-720p').method('magcache')['ratios']))")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "50"
