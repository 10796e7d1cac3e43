"""MagCache for the official Wan2.2 repo: copy this file into the root of a Wan-Video/Wan2.2 checkout (next to
upstream's generate.py) and run it with upstream's flags plus the published MagCache flags; see docs/wan22.md. It
needs stepcache installed in the same environment; upstream's code is used as it is.
"""
from stepcache.wan22.official_generate import run_script

if __name__ == "__main__":
    run_script("magcache")
