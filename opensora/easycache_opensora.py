"""EasyCache for Open-Sora 1.2 on the VideoSys fork (Zehong-Ma/MagCache, ali-vilab/TeaCache), run from anywhere or
beside eval/*/experiments/opensora.py; `--help` lists every flag, docs/opensora.md explains them:
    python easycache_opensora.py --prompts vbench --seeds 0 --out samples/opensora_easycache
"""
from stepcache.opensora.generate_set import run_script

if __name__ == "__main__":
    run_script("easycache")
