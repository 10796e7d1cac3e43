"""TeaCache for HunyuanVideo 1.5: a drop-in for the official repository (Tencent-Hunyuan/HunyuanVideo-1.5).

Copy this file into the root of a HunyuanVideo-1.5 checkout (with stepcache installed in its environment) and run
it with the flags of upstream's generate.py; the --cache_* and method flags are listed by --help.
"""
from stepcache.hunyuan15.official import run_script

if __name__ == "__main__":
    run_script("teacache")
