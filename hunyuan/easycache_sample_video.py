"""EasyCache for HunyuanVideo: a drop-in for the official repo (Tencent/HunyuanVideo).

Copy this file into the root of a HunyuanVideo checkout (with `pip install stepcache` done) and run it with the
flags of upstream's sample_video.py; --easycache-thresh and the other --cache-* flags are listed by --help.
"""
from stepcache.hunyuan.official import run_script

if __name__ == "__main__":
    run_script("easycache")
