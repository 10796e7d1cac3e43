"""Run one HunyuanVideo 1.5 drop-in in this process, on the tiny model (tests/hunyuan15_official_tiny.py), through
upstream's own generate.main(), and write what the test checks to OUT.json (and the transformer's outputs to
OUT.pt): python hunyuan15_official_worker.py ROOT METHOD OUT [script flags...].

A process of its own per run: importing generate.py initialises torch.distributed (a one-rank group), which must
not leak into the test process."""
import json
import os
import sys
from pathlib import Path

import torch

root, method, out = sys.argv[1:4]
argv = sys.argv[4:]
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
import hunyuan15_official_tiny as T  # noqa: E402

T.install(root)
from helpers import BlockWork  # noqa: E402
from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline  # noqa: E402

seen = {"outputs": [], "work": None}
fake = T.fake_create_pipeline()


def create_pipeline(*args, **kwargs):
    pipe = fake(*args, **kwargs)
    transformer = pipe.transformer
    # TeaCache evaluates block 0's modulation on every pass by design: not block work
    signal = tuple(n for n, m in transformer.named_modules()
                   if n.startswith("double_blocks.0.img_mod") and isinstance(m, torch.nn.Linear))
    seen["work"] = BlockWork(transformer, ("double_blocks",), exclude=signal)
    transformer.register_forward_hook(lambda m, a, o: seen["outputs"].append(o[0].detach().clone()))
    return pipe


HunyuanVideo_1_5_Pipeline.create_pipeline = staticmethod(create_pipeline)
os.chdir(root)
sys.argv = [str(Path(root) / f"{method}_generate.py")]
from stepcache.hunyuan15.official import main  # noqa: E402

status = main(method, argv)
work = seen["work"]
result = {"status": status, "ran": work.ran() if work else None, "passes": len(seen["outputs"])}
torch.save(seen["outputs"], out + ".pt")
Path(out + ".json").write_text(json.dumps(result))
