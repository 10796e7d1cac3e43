"""MagCache with Sparse VideoGen's attention for HunyuanVideo: a drop-in for a Sparse-VideoGen checkout.

Copy this file into the root of a svg-project/Sparse-VideoGen checkout (SVG1, commit 5efea72 or earlier; with
`pip install stepcache` done) and run it with the flags of Sparse-VideoGen's hyvideo_inference.py (--pattern SVG,
--sparsity, --first_times_fp, ...); --magcache-thresh, --magcache-K, --retention-ratio and the other --cache-*
flags are listed by --help.
"""
from stepcache.hunyuan.sparse_videogen import run_script

if __name__ == "__main__":
    run_script("magcache")
