"""stepcache's MagCache, TeaCache and EasyCache beside HunyuanVideo-1.5's own caches (--enable_cache) and plain
fewer steps, at equal computed steps, each scored against the uncached video: a drop-in for the official
repository (Tencent-Hunyuan/HunyuanVideo-1.5).

Copy this file into the root of a HunyuanVideo-1.5 checkout (with stepcache installed in its environment) and run
it with the flags of upstream's generate.py plus --bench_out DIR; --help lists the bench's flags.
"""
import sys

from stepcache.hunyuan15.official_bench import main

if __name__ == "__main__":
    sys.exit(main())
