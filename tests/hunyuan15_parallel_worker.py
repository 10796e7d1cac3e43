"""One rank of the HunyuanVideo 1.5 sequence-parallel tests, on CPU:
``torchrun --nproc_per_node=N hunyuan15_parallel_worker.py CASES.json OUT_DIR`` (started by
``tests/test_hunyuan15_parallel.py``; needs ``HUNYUANVIDEO15_REPO``).

Each case is one run of a drop-in script's ``main`` through upstream's own ``generate.main()`` on the tiny model of
tests/hunyuan15_official_tiny.py, all in this process: importing generate.py sets up upstream's sequence
parallelism once (degree = world size, its device mesh on gloo), and the transformer shards the image tokens,
runs Ulysses' all-to-all around attention and all-gathers its output, as on GPUs. A case is
``{"id", "method", "argv"}`` plus ``argv_by_rank`` (flags added on one rank only, to make the ranks' own rules
disagree). Each rank writes ``OUT_DIR/rank{r}.pt``: per case, the exit status, the blocks each pass ran and the
transformer's (gathered) outputs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
torch.set_num_threads(1)


def main(cases_file: str, out_dir: str) -> None:
    import hunyuan15_official_tiny as T

    root = os.environ["HUNYUANVIDEO15_REPO"]
    T.install(root)
    from helpers import BlockWork
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline

    seen: dict = {}
    fake = T.fake_create_pipeline()

    def create_pipeline(*args, **kwargs):
        pipe = fake(*args, **kwargs)
        transformer = pipe.transformer
        signal = tuple(n for n, m in transformer.named_modules()  # TeaCache's signal is read every pass: not work
                       if n.startswith("double_blocks.0.img_mod") and isinstance(m, torch.nn.Linear))
        seen["work"] = BlockWork(transformer, ("double_blocks",), exclude=signal)
        transformer.register_forward_hook(lambda m, a, o: seen["outputs"].append(o[0].detach().clone()))
        return pipe

    HunyuanVideo_1_5_Pipeline.create_pipeline = staticmethod(create_pipeline)
    rank = int(os.environ.get("RANK", "0"))
    os.chdir(root)
    from stepcache.hunyuan15.official import main as script

    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        seen.update(outputs=[], work=None)
        argv = [*case["argv"], *case.get("argv_by_rank", [[]] * (rank + 1))[rank]]
        sys.argv = [str(Path(root) / f"{case['method']}_generate.py")]
        status = script(case["method"], argv)
        work = seen["work"]
        results[case["id"]] = {"status": status, "ran": work.ran() if work else None, "outputs": seen["outputs"]}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
