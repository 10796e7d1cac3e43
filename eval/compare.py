"""`stepcache compare`: PSNR, SSIM and LPIPS of cached videos against uncached ones.

Two modes, with the flag names of the published tools so their commands work unchanged:
  folder mode  --gt_video_dir A --generated_video_dir B [C ...]   (TeaCache/MagCache common_metrics/eval.py)
  pair mode    --original_video a.mp4 --generated_video b.mp4      (EasyCache tools/video_metrics.py)

Every input is checked (names, readability, sizes, frame counts, weight files, manifests) before any metric is
computed, and nothing is written until every pair has been scored, so bad input costs seconds, not hours, and never
leaves a half-written report behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CompareError

EPILOG = """\
examples:
  stepcache compare --gt_video_dir out/baseline --generated_video_dir out/teacache-0.08 out/magcache-0.12 --out report/
  stepcache compare --original_video base.mp4 --generated_video cached.mp4

numbers (all videos are RGB scaled to [0, 1]):
  PSNR frame-mean  mean of per-frame PSNR (TeaCache/MagCache definition)      capped at 100 dB
  PSNR video       PSNR of the MSE over the whole video (EasyCache definition) capped at 100 dB
  SSIM             Gaussian 11x11, sigma 1.5, data range 1, per channel, valid window; 1 = identical
  LPIPS            AlexNet v0.1, inputs in [-1, 1], mean of the spatial map; 0 = identical

LPIPS needs two weight files and never downloads them. The backbone is torchvision's
alexnet-owt-7be5be79.pth: --lpips-weights, $LPIPS_BACKBONE_PATH, or $TORCH_HOME/hub/checkpoints/
(default ~/.cache/torch/hub/checkpoints/). The 6 KB heads come from an installed torchmetrics or lpips
package, or --lpips-heads. When either is missing, the other metrics are still computed and the
missing file is named.

A manifest.json (schema in stepcache/eval/manifest.py) in the reference and generated folders adds
speedups and, with --out, the plot speedup_vs_quality.png.

exit codes: 0 success, 2 bad input (message on stderr, nothing written)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG

    folder = parser.add_argument_group("folder mode (videos paired by identical file name)")
    folder.add_argument("--gt_video_dir", "--gt-video-dir", dest="gt_video_dir", metavar="DIR",
                        help="folder of reference (uncached) videos")
    folder.add_argument("--generated_video_dir", "--generated-video-dir", dest="generated_video_dir", metavar="DIR",
                        nargs="+", action="extend",
                        help="folder(s) of generated (cached) videos; give several, one per method and setting, to "
                             "get one row and one plot point each")
    folder.add_argument("--allow-missing", "--allow_missing", dest="allow_missing", action="store_true",
                        help="compare only the file names present in both folders instead of refusing when some "
                             "are missing from either (the unmatched names are listed in metrics.json)")

    pair = parser.add_argument_group("pair mode (one video against one video)")
    pair.add_argument("--original_video", "--original-video", dest="original_video", metavar="FILE",
                      help="the reference (uncached) video")
    pair.add_argument("--generated_video", "--generated-video", dest="generated_video", metavar="FILE",
                      help="the generated (cached) video")

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR",
                        help="write metrics.json (everything, including per-frame values), metrics.csv (one row "
                             "per video), summary.csv (one row per run) and, when timing manifests are present, "
                             "speedup_vs_quality.png into DIR; without it only the table is printed")
    output.add_argument("--psnr", choices=["frame", "video"], default="frame",
                        help="which PSNR is the headline (first column, plot axis): 'frame' = mean of per-frame "
                             "PSNR (TeaCache/MagCache), 'video' = PSNR of the whole video's MSE (EasyCache); both "
                             "are always reported (default: frame)")
    output.add_argument("--averaging", choices=["video", "batch"], default="video",
                        help="mean over videos: 'video' = plain mean of per-video numbers; 'batch' = the "
                             "published mean of batch means over batches of --batch-size videos in file-name "
                             "order (default: video)")
    output.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=16,
                        metavar="N", help="batch size for --averaging batch (default: 16, as published)")
    output.add_argument("--per-video", dest="per_video", action="store_true", default=None,
                        help="always print the per-video table (by default it is printed for up to 20 videos)")

    lpips = parser.add_argument_group("LPIPS")
    lpips.add_argument("--lpips-weights", "--lpips_weights", dest="lpips_weights", metavar="PATH",
                       help="torchvision backbone checkpoint (alexnet-owt-7be5be79.pth, or vgg16-397923af.pth "
                            "with --lpips-net vgg); overrides $LPIPS_BACKBONE_PATH and the torch hub cache")
    lpips.add_argument("--lpips-heads", "--lpips_heads", dest="lpips_heads", metavar="PATH",
                       help="LPIPS v0.1 linear-head file (lpips/weights/v0.1/alex.pth); by default taken from an "
                            "installed torchmetrics or lpips package")
    lpips.add_argument("--lpips-net", "--lpips_net", dest="lpips_net", choices=["alex", "vgg"], default="alex",
                       help="LPIPS backbone; the published numbers use alex (default: alex)")
    lpips.add_argument("--no-lpips", dest="no_lpips", action="store_true",
                       help="skip LPIPS (the slowest metric) even when its weights are available")

    compute = parser.add_argument_group("computation")
    compute.add_argument("--chunk-frames", dest="chunk_frames", type=_positive_int, default=8, metavar="N",
                         help="frames decoded and scored at a time; bounds memory (about 0.2 GB per frame pair at "
                              "720p with LPIPS) (default: 8)")
    compute.add_argument("--device", default="auto",
                         help="torch device for the metrics, e.g. cpu or cuda (default: cuda if available)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        report = compare(args)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .report import format_table

    print(format_table(report, per_video=args.per_video))
    if args.out:
        from .report import write_outputs

        for path in write_outputs(report, args.out):
            print(f"wrote {path}")
    return 0


def _runs_from_args(args) -> tuple[str, str, list]:
    """(mode, reference, [(generated, pairs, unmatched)]) from the mode flags, or CompareError if they conflict."""
    from .video import VideoPair, pair_folders

    folder_flags = args.gt_video_dir is not None or args.generated_video_dir
    pair_flags = args.original_video is not None or args.generated_video is not None
    if folder_flags and pair_flags:
        raise CompareError("choose one mode: folder mode (--gt_video_dir, --generated_video_dir) or pair mode "
                           "(--original_video, --generated_video), not both")
    if folder_flags:
        if args.gt_video_dir is None or not args.generated_video_dir:
            raise CompareError("folder mode needs both --gt_video_dir and --generated_video_dir")
        runs = [(d, *pair_folders(args.gt_video_dir, d, args.allow_missing)) for d in args.generated_video_dir]
        return "folder", args.gt_video_dir, runs
    if pair_flags:
        if args.original_video is None or args.generated_video is None:
            raise CompareError("pair mode needs both --original_video and --generated_video")
        original, generated = Path(args.original_video), Path(args.generated_video)
        return "pair", str(original), [(str(generated), [VideoPair(generated.name, original, generated)], {})]
    raise CompareError("nothing to compare: give --gt_video_dir and --generated_video_dir (folder mode) or "
                       "--original_video and --generated_video (pair mode); see --help")


def _check_videos(runs: list) -> None:
    """Probe every file once and report every bad one at once, so a user can fix a folder in one go."""
    from .video import check_pair, probe

    infos: dict[Path, object] = {}
    problems: list[str] = []

    def info(path: Path):
        if path not in infos:
            try:
                infos[path] = probe(path)
            except CompareError as exc:
                infos[path] = None
                problems.append(str(exc))
        return infos[path]

    for _, pairs, _ in runs:
        for pair in pairs:
            reference, generated = info(pair.reference), info(pair.generated)
            if reference is not None and generated is not None:
                try:
                    check_pair(reference, generated)
                except CompareError as exc:
                    if str(exc) not in problems:
                        problems.append(str(exc))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CompareError(f"{len(problems)} problem(s) with the input videos:\n  " + "\n  ".join(shown))


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _device(name: str, torch):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CompareError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompareError(f"--device {name}: CUDA is not available in this torch build or machine")
    return device


def compare(args: argparse.Namespace) -> dict:
    """Check the input, score every pair and return the report dict (the content of metrics.json)."""
    mode, reference, runs = _runs_from_args(args)
    _check_videos(runs)

    from .manifest import load_manifest, timing

    reference_manifest = load_manifest(reference if mode == "folder" else Path(reference).parent)
    generated_manifests = [load_manifest(g if mode == "folder" else Path(g).parent) for g, _, _ in runs]

    import torch
    from tqdm import tqdm

    from .lpips import LpipsSetup, load_lpips
    from .report import DEFINITIONS
    from .scoring import average_scores, score_pair

    device = _device(args.device, torch)
    if args.no_lpips:
        lpips = LpipsSetup(None, {"status": "skipped", "reason": "LPIPS skipped: --no-lpips"})
    else:
        lpips = load_lpips(args.lpips_net, args.lpips_weights, args.lpips_heads, device)
    if not lpips.available:
        # said once, now, not only after hours of scoring (the table leaves it out; metrics.json keeps it)
        print(lpips.description["reason"], file=sys.stderr)

    labels = _unique_labels([m.display_label if m else Path(g).name
                             for (g, _, _), m in zip(runs, generated_manifests)])
    report_runs = []
    for (generated, pairs, unmatched), manifest, label in zip(runs, generated_manifests, labels):
        scores = [score_pair(pair, lpips.scorer, args.chunk_frames, device)
                  for pair in tqdm(pairs, desc=label, unit="video", disable=None, file=sys.stderr)]
        timing_names = [(p.reference.name, p.generated.name) for p in pairs]
        report_runs.append({
            "label": label, "generated": str(generated),
            "method": manifest.method if manifest else "unknown", "params": manifest.params if manifest else {},
            "mean": average_scores(scores, args.averaging, args.batch_size),
            "timing": timing(reference_manifest, manifest, timing_names),
            "unmatched": unmatched,
            "videos": [{**s.summary(), "per_frame": s.per_frame()} for s in scores],
        })
    averaging = {"method": args.averaging}
    if args.averaging == "batch":
        averaging["batch_size"] = args.batch_size
    return {
        "tool": "stepcache compare", "mode": mode, "reference": str(reference),
        "headline_psnr": "psnr_frame_mean" if args.psnr == "frame" else "psnr_video",
        "averaging": averaging, "definitions": DEFINITIONS, "lpips": lpips.description,
        "runs": report_runs,
    }
