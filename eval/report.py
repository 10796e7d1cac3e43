"""Presenting a comparison: the terminal table, metrics.json, metrics.csv, summary.csv and the speedup plot.

Everything is derived from one report dict (the content of metrics.json), so the files cannot disagree.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .metrics import PSNR_CAP_DB
from .scoring import METRIC_KEYS

DEFINITIONS = {
    "psnr_frame_mean": f"mean over frames of each frame's PSNR (TeaCache/MagCache); dB, higher is closer; "
                       f"{PSNR_CAP_DB:g} when a frame's MSE < 1e-10",
    "psnr_video": f"PSNR of one MSE over the whole video (EasyCache); dB, higher is closer; "
                  f"{PSNR_CAP_DB:g} when the MSE < 1e-10",
    "psnr_frame_min": "the worst single frame's PSNR; dB",
    "ssim": "mean over frames of SSIM (Gaussian 11x11, sigma 1.5, data range 1, per channel, valid window); "
            "1 = identical",
    "lpips": "mean over frames of LPIPS v0.1 (AlexNet unless stated; inputs in [-1, 1]; mean of the spatial map); "
             "0 = identical, lower is closer",
}
LABELS = {"psnr_frame_mean": "PSNR frame-mean", "psnr_video": "PSNR video", "ssim": "SSIM", "lpips": "LPIPS"}
FORMATS = {"psnr_frame_mean": "{:.2f}", "psnr_video": "{:.2f}", "psnr_frame_min": "{:.2f}", "ssim": "{:.4f}",
           "lpips": "{:.4f}", "speedup": "{:.2f}x", "pass_speedup": "{:.2f}x"}
PER_VIDEO_ROWS_MAX = 20  # beyond this the per-video table drowns the summary; the CSV has them all
PLOT_NAME = "speedup_vs_quality.png"


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return FORMATS.get(key, "{}").format(value)


def _metric_columns(report: dict) -> list[str]:
    # The headline PSNR goes first, so the column a reader looks at is the one chosen with --psnr.
    headline = report["headline_psnr"]
    return [headline] + [k for k in METRIC_KEYS if k != headline]


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(report: dict, per_video: bool | None = None) -> str:
    """Per-video rows (when few, or when asked) and one summary row per run."""
    columns = _metric_columns(report)
    blocks = []
    total_videos = sum(len(run["videos"]) for run in report["runs"])
    if per_video or (per_video is None and total_videos <= PER_VIDEO_ROWS_MAX):
        rows = [[run["label"], v["video"], str(v["frames"])] + [_fmt(k, v[k]) for k in columns]
                for run in report["runs"] for v in run["videos"]]
        blocks.append(_render(["run", "video", "frames"] + [LABELS[k] for k in columns], rows))
    elif per_video is None:
        blocks.append(f"({total_videos} videos: per-video numbers are in metrics.csv with --out, "
                      f"or shown with --per-video)")
    if report["mode"] == "folder":
        averaging = report["averaging"]
        how = "per-video mean" if averaging["method"] == "video" else \
            f"mean of batch means, batch size {averaging['batch_size']}"
        rows = [[run["label"], str(len(run["videos"]))] + [_fmt(k, run["mean"][k]) for k in columns] +
                [_fmt("speedup", run["timing"].get("speedup")), _fmt("pass_speedup", run["timing"].get("pass_speedup"))]
                for run in report["runs"]]
        blocks.append(f"Mean over videos ({how}):\n" +
                      _render(["run", "videos"] + [LABELS[k] for k in columns] + ["speedup", "pass speedup"], rows))
    else:
        timing = report["runs"][0]["timing"]
        if timing:
            blocks.append(f"speedup {_fmt('speedup', timing.get('speedup'))}, "
                          f"pass speedup {_fmt('pass_speedup', timing.get('pass_speedup'))}")
    return "\n\n".join(blocks)


def write_outputs(report: dict, out_dir: str | Path) -> list[Path]:
    """metrics.json, metrics.csv (one row per video), summary.csv (one row per run) and, with timings, the plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.csv", out_dir / "summary.csv"]
    written[0].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    video_columns = ["run", "video", "frames", "width", "height", *METRIC_KEYS, "psnr_frame_min"]
    _write_csv(written[1], video_columns,
               [{"run": run["label"], **v} for run in report["runs"] for v in run["videos"]])
    summary_columns = ["run", "method", "generated", "videos", *METRIC_KEYS, "psnr_frame_min", "averaging",
                       "speedup", "pass_speedup", "seconds_mean", "baseline_seconds_mean"]
    _write_csv(written[2], summary_columns,
               [{"run": run["label"], "method": run["method"], "generated": run["generated"],
                 "videos": len(run["videos"]), **run["mean"], "averaging": report["averaging"]["method"],
                 **run["timing"]} for run in report["runs"]])
    if any("speedup" in run["timing"] for run in report["runs"]):
        written.append(plot_speedup(report, out_dir / PLOT_NAME))
    return written


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


def plot_speedup(report: dict, path: Path) -> Path:
    """One panel per quality metric, speedup on x, one point per run (method and setting) that has timings."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    runs = [run for run in report["runs"] if "speedup" in run["timing"]]
    metrics = [report["headline_psnr"], "ssim"] + (["lpips"] if report["lpips"]["status"] == "ok" else [])
    methods = sorted({run["method"] for run in runs})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for method in methods:
            points = [(run["timing"]["speedup"], run["mean"][key], run["label"]) for run in runs
                      if run["method"] == method and run["mean"][key] is not None]
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=colours[method], label=method, zorder=3)
            for x, y, label in points:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("speedup over the reference run (x)")
        ax.set_ylabel(LABELS[key] + (" (lower is better)" if key == "lpips" else " (higher is better)"))
        ax.grid(True, alpha=0.3)
        ax.margins(0.2)  # room for the point labels
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Quality vs speedup against {Path(report['reference']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
