"""stepcache: training-free step caching (TeaCache, MagCache, EasyCache) for video diffusion transformers.

Every folder of the repository installs under the one import name ``stepcache``: ``common/`` is the core
package itself and the model families are its subpackages, so nothing generic such as ``common`` or ``eval``
lands in site-packages.
"""
from setuptools import setup

PACKAGES = {
    "stepcache": "common",
    "stepcache.methods": "common/methods",
    "stepcache.wan21": "wan21",
    "stepcache.wan22": "wan22",
    "stepcache.hunyuan": "hunyuan",
    "stepcache.hunyuan15": "hunyuan15",
    "stepcache.opensora": "opensora",
    "stepcache.eval": "eval",
    "stepcache.wan21.demo": "wan21/demo",
    "stepcache.wan21.demo.folder": "wan21/demo/folder",
    "stepcache.wan22.demo": "wan22/demo",
}

# torch is deliberately unpinned here; install it first with `pip install torch==2.13.0` (a CPU wheel) or the
# build that matches your GPU. A plain `torch` requirement resolved from scratch pulls a multi-GB CUDA build.
DIFFUSERS = ["diffusers==0.42.1", "transformers>=4.50", "accelerate>=1.0", "sentencepiece", "ftfy"]
VIDEO = ["imageio>=2.30", "imageio-ffmpeg>=0.5"]
EVAL = VIDEO + ["scipy>=1.10", "matplotlib>=3.7", "torchmetrics>=1.3"]  # torchmetrics: only for its 6 KB LPIPS heads files
TEST = ["pytest>=7", "pytest-timeout"]
# The opt-in tests against upstream checkouts (HUNYUANVIDEO_REPO, HUNYUANVIDEO15_REPO, WAN21_REPO, WAN22_REPO,
# OPENSORA_REPO; tests/helpers.py):
# TEST, diffusers and imageio, and the pure-Python modules those repositories import on the CPU code paths the tests
# run. HunyuanVideo: einops, loguru. Wan2.1: easydict, einops, ftfy, regex, Pillow. The Open-Sora fork: einops,
# omegaconf, rotary-embedding-torch, rich (its logger); its OpenSoraPipeline also beautifulsoup4 and ftfy (caption
# cleaning) and requests.
UPSTREAM = ["einops", "loguru", "easydict", "ftfy", "regex", "omegaconf", "beautifulsoup4", "rotary-embedding-torch",
            "rich", "requests", "Pillow"]

setup(
    name="stepcache",
    version="0.1.0",
    description="Training-free step caching (TeaCache, MagCache, EasyCache) for HunyuanVideo 1.0/1.5, Wan2.1/2.2 and "
                "Open-Sora",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"stepcache": ["profiles/*.json"], "stepcache.eval": ["data/*"],
                  "stepcache.wan21.demo": ["weights/*.safetensors", "weights/*.json", "assets/*.png"],
                  "stepcache.wan22.demo": ["weights/*.safetensors"]},
    include_package_data=True,
    install_requires=["torch>=2.1", "numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        "diffusers": DIFFUSERS,
        "video": VIDEO,
        "eval": EVAL,
        "test": TEST + DIFFUSERS + EVAL + ["cache-dit==1.5.3"],  # so the bench tests reach a real peer
        "all": DIFFUSERS + EVAL,
        "upstream-tests": TEST + DIFFUSERS + VIDEO + UPSTREAM,  # pip install -e ".[upstream-tests]"
        "bench": DIFFUSERS + EVAL + ["cache-dit==1.5.3"],  # `stepcache bench`'s peers (cache-dit; diffusers' own)
    },
    entry_points={"console_scripts": ["stepcache=stepcache.cli:main"],
                  # The model families the core finds (stepcache.families); a family of your own adds a line.
                  "stepcache.families": ["hunyuanvideo=stepcache.hunyuan:FAMILY",
                                         "hunyuanvideo1.5=stepcache.hunyuan15:FAMILY",
                                         "opensora=stepcache.opensora:FAMILY",
                                         "wan2.1=stepcache.wan21:FAMILY", "wan2.2=stepcache.wan22:FAMILY"]},
)
