"""MagCache for Open-Sora 1.2 on the VideoSys fork that Zehong-Ma/MagCache and ali-vilab/TeaCache ship
(`pip install -e .` in a checkout of either). Run it from anywhere, or copy it next to `eval/*/experiments/opensora.py`:

    python magcache_opensora.py --prompts vbench --seeds 0 --out samples/opensora_magcache [--thresh ... --preset ...]

It patches the pipeline's STDiT3 *instance* (never its class) and writes one video per prompt and seed, resumable,
with a timing manifest; `--help` lists every flag. The one implementation is stepcache.opensora.generate_set.
"""
import sys

from stepcache.opensora.generate_set import main

if __name__ == "__main__":
    sys.exit(main(method="magcache"))
