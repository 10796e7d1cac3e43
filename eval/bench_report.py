"""`stepcache bench`'s results: rows per run, the verdict, the table, the plot.

Speedups. ``wall``: the median over timing rounds of (mean of the baseline times just before and just after the
run, in the same process and round) / (the run's time), so drift of the machine cancels out and a resumed run in
another process is compared with a baseline timed in that process.
``ideal``: the baseline's real block work divided by the run's (the multiply-adds of the ``nn.Linear`` layers
inside the block stack that ran); for stepcache and fewer steps this is exactly passes / computed passes.
``wall / ideal`` is a method's overhead (target for stepcache: at least 0.97).

Placing a run on the wall-clock axis. A run cannot be faster than its ideal speedup (skipping work is all a
cache does), so a wall-clock speedup above ideal is timing noise (a busy machine slowed the baselines around it):
the run is placed at min(wall, ideal) and the report says so. And a wall-clock gap smaller than its spread ranks
nothing: every wall figure is shown with the range over its timing rounds, and at each target the verdict is
worked out twice, with each run at its median (capped) and at its slowest round (capped); where the two differ
the ranking there lies within the timing spread, which the verdict says, and the goal does not count as met.

PSNR at a speedup X: per method, the highest PSNR among its runs that are at least X times faster than the
baseline (a measured run, no interpolation); none when no run of the method is that fast. Ties (within
0.01 dB, e.g. two implementations of one rule making the same decisions) are reported as ties, not wins.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path

from ..outputs import atomic_path
from . import published

TARGETS = (2.0, 2.5, 3.0)
OVERHEAD_TARGET = 0.97
FAMILY_ORDER = ("baseline", "floor", "stepcache", "diffusers", "cache-dit")
# Shown when the goal is missed: what the demo model's full runs (docs/benchmarks) found moves the curves.
WHAT_WOULD_CHANGE_IT = [
    "linear prediction (stepcache's predict='linear', the '(linear prediction)' curves): a reused pass "
    "extrapolates the last two computed residuals instead of repeating the last one; on the demo model it is "
    "what lifted stepcache above fewer steps and the peers, with short runs of reuse (MagCache K=2)",
    "shorter warm-ups with linear prediction: the published ones were tuned for reuse and cap the speedup of "
    "short reuse runs (MagCache K=2 after a 20 % retention cannot pass 2.14x on 30 steps); the full sweep has "
    "retention 0.04 and 0.1 and EasyCache warm-up 3 for the linear curves, quick mode has none of them",
    "a gate that picks better steps than a fixed pattern: with linear prediction, one computed pass in every k "
    "(the 'fixed skip, linear prediction' floor) matched or beat the three methods' gates at 2x and 3x on the "
    "demo model. The gates measure how much the model's input or output changes, which is what matters when "
    "a pass is repeated; with extrapolation what matters is how far the change departs from a straight line, "
    "which none of them measures",
    "not a longer warm-up: the exploratory 'protected warm-up' curves (the first 30 % of the steps always "
    "computed) lie below the unprotected ones on the demo model",
]


# ------------------------------------------------------------------------------------------------ rows
def _median(values):
    return statistics.median(values) if values else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _setting(row: dict) -> str:
    params, config = row["params"], row.get("config") or {}
    parts = []
    for key, value in params.items():
        if key == "x_medium":
            parts.append(f"thresh={config.get('thresh')} ({value}x medium)")
        elif key == "k" and row["method"].startswith("floor-fixed"):
            parts.append(f"1 of {value} computed (K={value - 1})")
        elif value is not None:
            parts.append(f"{key}={value}")
    return ", ".join(parts) or "-"


def wall_placement(speeds: list[float], ideal: float | None) -> dict:
    """Where a run stands on the wall-clock axis: its median over rounds and its slowest round, each at most its
    ideal speedup (a run is never faster than the work it skips allows; above that is noise), the range over
    rounds, and whether the median came out above ideal."""
    if not speeds:
        return {"wall_placed": None, "wall_low": None, "wall_range": None, "wall_above_ideal": False}
    wall, low = _median(speeds), min(speeds)
    cap = ideal if ideal else float("inf")
    return {"wall_placed": min(wall, cap), "wall_low": min(low, cap), "wall_range": [low, max(speeds)],
            "wall_above_ideal": wall > cap}


def _placed(row: dict) -> dict:
    """A row with its wall-clock placement (rows made before it existed, or by hand, have only the speedups)."""
    if "wall_placed" in row or row.get("reference"):
        return row
    speeds = row.get("wall_speedups") or ([row["wall_speedup"]] if row.get("wall_speedup") is not None else [])
    return {**row, **wall_placement(speeds, row.get("ideal_speedup"))}


def build_rows(settings, records, runs) -> tuple[list[dict], dict]:
    quality, timings = {}, defaultdict(list)
    base_times = defaultdict(list)
    shares = [r["share"] for r in records if r.get("kind") == "non_block"]
    share = statistics.median(shares) if shares else None
    for r in records:
        kind = r.get("kind")
        if kind == "quality":
            quality[r["run"]] = r
        elif kind == "baseline_timing":
            base_times[(r["session"], r["round"])].append(r["seconds"])
    # Each timing is compared with the baselines timed just before and just after it in the same process and
    # round (the file is in time order), so that slow drift of the machine cancels out.
    last_base: dict = {}
    waiting: dict = defaultdict(list)
    for r in records:
        kind = r.get("kind")
        if kind == "timing":
            key = (r["session"], r["round"])
            entry = dict(r, before=last_base.get(key))
            timings[r["run"]].append(entry)
            waiting[key].append(entry)
        elif kind == "baseline_timing":
            key = (r["session"], r["round"])
            last_base[key] = r["seconds"]
            for entry in waiting.pop(key, []):
                entry["after"] = r["seconds"]
    base = quality.get("baseline[]")
    videos = len(settings["pairs"])
    # transformer calls of the uncached video: two per step with CFG, one for a guidance-distilled model
    # (HunyuanVideo's embedded guidance)
    total_passes = (round(sum(v["calls"] for v in base["per_video"]) / len(base["per_video"])) if base
                    else 2 * settings["steps"])
    base_macs = sum(v["macs"] for v in base["per_video"]) if base else None
    baseline_seconds = _median([s for v in base_times.values() for s in v])
    rows = []
    for run in runs:
        m = run.method
        row = {"id": run.id, "method": m.key, "label": m.label, "family": m.family, "params": run.params,
               "exploratory": m.exploratory, "note": m.note}
        reason = m.unavailable()
        q = quality.get(run.id)
        if m.key == "baseline":
            row.update(status="ok" if base else "pending", config=(base or {}).get("config"),
                       passes=total_passes, computed_passes=total_passes, compute_fraction=1.0, ideal_speedup=1.0,
                       wall_speedup=1.0 if base_times else None, wall_placed=1.0 if base_times else None,
                       wall_low=1.0 if base_times else None, seconds=baseline_seconds, overhead=None,
                       reference=True, prompt_match=_mean([v.get("match") for v in (base or {}).get("per_video", [])]))
            rows.append(row)
            continue
        if reason and q is None:
            row.update(status="unavailable", reason=reason)
        elif q is None:
            row.update(status="pending")
        elif q["status"] != "ok":
            row.update(status=q["status"], reason=q.get("reason"), config=q.get("config"), version=q.get("version"))
        else:
            pv = q["per_video"]
            frac = sum(v["macs"] for v in pv) / base_macs
            speeds = []
            for t in timings.get(run.id, []):
                around = [b for b in (t.get("before"), t.get("after")) if b]
                if around and t["seconds"] > 0:
                    speeds.append(sum(around) / len(around) / t["seconds"])
            wall = _median(speeds)
            ideal = 1.0 / frac if frac > 0 else None
            row.update(status="ok", config=q.get("config"), version=q.get("version"), steps=q.get("steps"),
                       passes=sum(v["calls"] for v in pv) / videos, computed_passes=frac * total_passes,
                       compute_fraction=frac, ideal_speedup=ideal, wall_speedup=wall,
                       wall_speedups=speeds, **wall_placement(speeds, ideal),
                       seconds=_median([t["seconds"] for t in timings.get(run.id, [])]),
                       overhead=(wall / ideal) if wall and ideal else None,
                       psnr=_mean([v["psnr"] for v in pv]), psnr_video=_mean([v["psnr_video"] for v in pv]),
                       psnr_frame_min=min(v["psnr_frame_min"] for v in pv),
                       ssim=_mean([v["ssim"] for v in pv]), lpips=_mean([v.get("lpips") for v in pv]),
                       prompt_match=_mean([v.get("match") for v in pv]), per_video=pv)
            if share is not None and ideal:
                # the best wall/ideal any method gets at this compute fraction when its skipped passes still run
                # everything outside the blocks (share of a pass): f / (f (1 - share) + share)
                row["overhead_ceiling"] = 1.0 if m.skips_whole_pass else frac / (frac * (1 - share) + share)
            if "stepcache_computed" in pv[0]:
                row["stepcache_passes"] = [sum(v["stepcache_computed"] for v in pv) / videos,
                                           sum(v["stepcache_total"] for v in pv) / videos]
                row["pattern"] = pv[0].get("pattern")
        row["setting"] = _setting(row)
        rows.append(row)
    return rows, {"baseline_seconds": baseline_seconds, "videos": videos, "total_passes": total_passes,
                  "non_block_share": share}


# --------------------------------------------------------------------------------------------- frontier
def frontier(points: list[tuple]) -> list[tuple]:
    """Points (speedup, psnr, ...) that no other point beats on both, by increasing speedup."""
    best, out = float("-inf"), []
    for point in sorted(points, key=lambda sp: (-sp[0], -sp[1])):
        if point[1] > best:
            out.append(point)
            best = point[1]
    return sorted(out)


def best_at(points, x: float):
    """The point with the highest PSNR among those at least ``x`` times faster than the baseline, or None.

    No interpolation: every number in the verdict is a run that was measured (a PSNR capped at 100 dB for an
    unchanged video makes interpolating between points meaningless)."""
    fast = [p for p in points if p[0] >= x]
    return max(fast, key=lambda p: p[1]) if fast else None


def value_at(points, x: float) -> float | None:
    best = best_at(points, x)
    return None if best is None else best[1]


AXIS_KEYS = {"wall": "wall_placed", "wall_low": "wall_low", "ideal": "ideal_speedup"}


def curves(rows, axis: str, include_exploratory=False) -> dict[str, list[tuple]]:
    """Per method, (speedup, psnr, run id) of every scored run; on the wall axis each run at its median over
    rounds and on ``wall_low`` at its slowest round, both at most its ideal speedup."""
    out: dict[str, list] = defaultdict(list)
    key = AXIS_KEYS[axis]
    for r in map(_placed, rows):
        if r["status"] != "ok" or r.get("reference") or r.get(key) is None or r.get("psnr") is None:
            continue
        if r["exploratory"] and not include_exploratory:
            continue
        out[r["method"]].append((r[key], r["psnr"], r["id"]))
    return dict(out)


TIE_DB = 0.01   # PSNR differences below this are ties (two implementations of one rule land on the same video)


def verdict(rows, axis: str) -> dict:
    labels = {r["method"]: r["label"] for r in rows}
    families = {r["method"]: r["family"] for r in rows}
    wall_of = {r["id"]: {"wall": r.get("wall_speedup"), "wall_range": r.get("wall_range"),
                         "ideal": r.get("ideal_speedup"), "above_ideal": r.get("wall_above_ideal", False)}
               for r in map(_placed, rows)} if axis != "ideal" else {}
    c = curves(rows, axis)
    exploratory = {k: v for k, v in curves(rows, axis, True).items() if k not in c}
    at = {}
    for x in TARGETS:
        best = {k: best_at(pts, x) for k, pts in c.items()}
        values = {k: (None if b is None else b[1]) for k, b in best.items()}
        runs = {k: (None if b is None else {"run": b[2], "speedup": b[0], "psnr": b[1], **wall_of.get(b[2], {})})
                for k, b in best.items()}
        reached = {k: v for k, v in values.items() if v is not None}
        winner = max(reached, key=reached.get) if reached else None
        stepcache = {k: v for k, v in reached.items() if families[k] == "stepcache"}
        best_sc = max(stepcache, key=stepcache.get) if stepcache else None
        beaten_by, tied_with = [], []
        for k, v in reached.items():
            if families[k] == "stepcache":
                continue
            entry = {"method": k, "label": labels[k], "psnr": v, "run": runs[k]["run"],
                     "margin_db": None if best_sc is None else v - stepcache[best_sc]}
            if best_sc is None or v > stepcache[best_sc] + TIE_DB:
                beaten_by.append(entry)
            elif v >= stepcache[best_sc] - TIE_DB:
                tied_with.append(entry)
        at[str(x)] = {"values": values, "runs": runs, "winner": winner, "winner_label": labels.get(winner),
                      "stepcache_best": best_sc, "stepcache_best_psnr": stepcache.get(best_sc),
                      "goal_met": best_sc is not None and not beaten_by and not tied_with,
                      "beaten_by": beaten_by, "tied_with": tied_with,
                      "exploratory": {k: value_at(pts, x) for k, pts in exploratory.items()}}
    result = {"axis": axis, "rule": "per method, the highest PSNR among its runs at least this fast", "at": at}
    if axis == "wall":
        settle(result, verdict(rows, "wall_low"))
    return result


def settle(wall: dict, slowest: dict) -> None:
    """Mark the targets where the answer changes when every run counts at its slowest timing round instead of its
    median: the ranking there rests on a wall-clock gap smaller than the spread, so it ranks nothing, and the goal
    is not counted as met there."""
    for x, e in wall["at"].items():
        other = slowest["at"][x]
        e["within_spread"] = e["winner"] != other["winner"] or e["goal_met"] != other["goal_met"]
        e["at_slowest_round"] = {"winner": other["winner"], "winner_label": other["winner_label"],
                                 "winner_run": (other["runs"].get(other["winner"]) or {}).get("run"),
                                 "stepcache_best": other["stepcache_best"], "goal_met": other["goal_met"]}
        e["goal_met"] = e["goal_met"] and other["goal_met"]


def overhead_summary(rows) -> dict:
    out = {}
    for r in rows:
        if r["family"] != "stepcache" and not r["method"].startswith("floor-fixed"):
            continue
        if r["status"] != "ok" or r.get("overhead") is None or r["compute_fraction"] > 0.99:
            continue
        out.setdefault(r["method"], []).append(r["overhead"])
    ceilings = defaultdict(list)
    for r in rows:
        if r["method"] in out and r.get("overhead") is not None and r.get("overhead_ceiling"):
            ceilings[r["method"]].append(r["overhead"] / r["overhead_ceiling"])
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v),
                "target": OVERHEAD_TARGET, "ok": statistics.median(v) >= OVERHEAD_TARGET,
                "of_ceiling": statistics.median(ceilings[k]) if ceilings.get(k) else None}
            for k, v in out.items()}


def _speed(entry: dict) -> str:
    """A run's speed as the verdict places it, with its spread over timing rounds, and the measured median when
    that came out above ideal (then the run is placed at ideal)."""
    if entry.get("wall") is None:
        return f"{entry['speedup']:.2f}x"
    text = f"{entry['speedup']:.2f}x"
    if entry.get("above_ideal"):
        text += f" = its ideal; measured {entry['wall']:.2f}x, above ideal: timing noise"
    low, high = entry.get("wall_range") or (None, None)
    if low is not None and high - low > 0:
        text += f", rounds {low:.2f}-{high:.2f}x"
    return text


def verdict_text(rows, v: dict, overhead: dict) -> list[str]:
    labels = {r["method"]: r["label"] for r in rows}
    settings = {r["id"]: r.get("setting", "") for r in rows}
    lines = []
    for x, e in v["at"].items():
        x = float(x)
        if e["winner"] is None:
            lines.append(f"At {x:g}x: no method reaches this speedup.")
            continue
        w = e["runs"][e["winner"]]
        text = (f"At {x:g}x: highest PSNR {w['psnr']:.2f} dB, {e['winner_label']} ({settings[w['run']]}, "
                f"{_speed(w)})")
        if e["stepcache_best"] is None:
            text += "; no stepcache method reaches this speedup"
        elif e["goal_met"]:
            text += "; stepcache beats every other method of this run here"
        elif e.get("within_spread") and not e["beaten_by"] and not e["tied_with"]:
            text += "; stepcache is ahead at the median of the timing rounds only"
        else:
            sc = e["runs"][e["stepcache_best"]]
            text += (f"; stepcache's best: {labels[e['stepcache_best']]} {sc['psnr']:.2f} dB "
                     f"({settings[sc['run']]}{', ' + _speed(sc) if v['axis'] != 'ideal' else ''})")
            if e["beaten_by"]:
                text += ", beaten by " + ", ".join(f"{b['label']} (+{b['margin_db']:.2f} dB)"
                                                   for b in sorted(e["beaten_by"], key=lambda b: -b["psnr"]))
            if e["tied_with"]:
                text += ", tied with " + ", ".join(b["label"] for b in e["tied_with"])
        if e.get("within_spread"):
            slow = e["at_slowest_round"]
            text += ("; WITHIN THE TIMING SPREAD: with every run at its slowest round, "
                     + (f"{slow['winner_label']} ({settings[slow['winner_run']]}) is highest"
                        if slow["winner"] else "no method reaches this speedup")
                     + (", and stepcache's best beats every other method" if slow["goal_met"] else
                        ", and stepcache's best does not beat every other method")
                     + ", so the wall-clock ranking here is not settled")
        explored = {k: p for k, p in e["exploratory"].items() if p is not None}
        if explored:
            text += "; exploratory: " + ", ".join(f"{labels[k]} {p:.2f} dB" for k, p in explored.items())
        lines.append(text + ".")
    for key, o in overhead.items():
        text = (f"Overhead of {labels[key]}: wall/ideal speedup median {o['median']:.3f} "
                f"(range {o['min']:.3f}-{o['max']:.3f} over {o['runs']} runs), target {OVERHEAD_TARGET}: "
                f"{'met' if o['ok'] else 'NOT met'}")
        if o.get("of_ceiling") is not None:
            text += (f"; {o['of_ceiling']:.3f} of what this model allows at the same compute (the embeddings, "
                     f"rope and head still run on a skipped pass)")
        lines.append(text + ".")
    return lines


# ---------------------------------------------------------------------------------------------- report
def build_report(settings, records, runs, label, command, model_info, calibration, lpips, seconds,
                 complete, unfinished=()) -> dict:
    rows, totals = build_rows(settings, records, runs)
    wall = verdict(rows, "wall")
    ideal = verdict(rows, "ideal")
    overhead = overhead_summary(rows)
    goal_missed = [float(x) for x, e in wall["at"].items() if not e["goal_met"]]
    text = verdict_text(rows, wall, overhead)
    text_ideal = verdict_text(rows, ideal, {})
    could_not_run = [{"method": r["method"], "label": r["label"], "run": r["id"], "status": r["status"],
                      "reason": r.get("reason")} for r in rows if r["status"] in ("unavailable", "error")]
    return {
        "format": "stepcache-bench-report/1", "label": label, "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "complete": complete,
        "unfinished": list(unfinished),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "settings": settings, "model": model_info, "calibration": calibration, "lpips": lpips,
        "totals": totals, "seconds": seconds, "rows": rows,
        "verdict": {"wall": wall, "ideal": ideal, "text": text, "text_ideal": text_ideal,
                    "goal": "at equal speedup, stepcache's best method gives higher PSNR than every peer and "
                            "than the fewer-steps floor",
                    "goal_missed_at": goal_missed,
                    "what_would_change_it": WHAT_WOULD_CHANGE_IT if goal_missed else []},
        "overhead": overhead, "could_not_run": could_not_run, "published": published.beside(rows, settings),
    }


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def _ceiling(row) -> str:
    c = row.get("overhead_ceiling")
    return f" (<={c:.2f})" if c is not None and c < 0.995 else ""


def _wall_cell(row) -> str:
    """The median wall-clock speedup, its range over timing rounds, and '>ideal' when it came out above ideal
    (the verdict then places the run at its ideal speedup)."""
    if row.get("wall_speedup") is None:
        return "-"
    text = f"{row['wall_speedup']:.2f}x"
    low, high = row.get("wall_range") or (None, None)
    if low is not None and high - low > 0:
        text += f" ({low:.2f}-{high:.2f})"
    return text + (" >ideal" if row.get("wall_above_ideal") else "")


def format_table(report) -> str:
    total = report["totals"]["total_passes"]
    matching = any(r.get("prompt_match") is not None for r in report["rows"])
    match_head, match_rule = (" prompt match |", "---|") if matching else ("", "")

    def match(row) -> str:
        return f" {_fmt(row.get('prompt_match'), '.0%')} |" if matching else ""
    head = ("| method | setting | passes computed | ideal | wall | wall/ideal | PSNR | PSNR video | SSIM | LPIPS |"
            + match_head + "\n|---|---|---|---|---|---|---|---|---|---|" + match_rule)
    lines = [head]
    rows = sorted(report["rows"], key=lambda r: (FAMILY_ORDER.index(r["family"]), r["exploratory"], r["method"],
                                                 -(r.get("compute_fraction") or 0)))
    for r in rows:
        name = r["label"] + (" *" if r["exploratory"] else "")
        if r.get("reference"):
            steps = report["settings"]["steps"]
            lines.append(f"| {name} | {r['params'] or ''}{steps} steps | {total}/{total} | 1.00x | 1.00x | - | "
                         f"reference | reference | reference | reference |" + match(r))
            continue
        if r["status"] != "ok":
            lines.append(f"| {name} | {r.get('setting', '-')} | {r['status']}: {r.get('reason') or ''} "
                         f"| | | | | | | |" + (" |" if matching else ""))
            continue
        exact = r["family"] in ("stepcache", "floor")
        computed = f"{r['computed_passes']:.0f}/{total}" if exact else f"{r['computed_passes']:.1f}/{total} eq."
        lines.append(
            f"| {name} | {r['setting']} | {computed} | {r['ideal_speedup']:.2f}x | {_wall_cell(r)} "
            f"| {_fmt(r['overhead'], '.3f')}{_ceiling(r)} | {r['psnr']:.2f} | {r['psnr_video']:.2f} | {r['ssim']:.4f} "
            f"| {_fmt(r['lpips'], '.4f')} |" + match(r))
    return "\n".join(lines)


def _common_config(rows) -> tuple[dict, list[str]]:
    configs = [r.get("config") or {} for r in rows if r.get("config")]
    if not configs:
        return {}, []
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    varying = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in common]
    return common, varying


def format_markdown(report, plot_name: str | None) -> str:
    s = report["settings"]
    label = report["label"]
    title = "stepcache bench" + (f" — {label}" if label else " — demo model")
    out = [f"# {title}", ""]
    if not report["complete"]:
        missing = report.get("unfinished") or []
        out += ["**INCOMPLETE**: stopped before every run finished; run the same command again to resume."
                + (f" Unfinished ({len(missing)}): " + ", ".join(missing) if missing else ""), ""]
    out += [f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
            f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
            f"{s['threads']} torch thread(s), {s['clock']} clock, load average {report['machine']['load_average']}  ",
            f"Model: {json.dumps(report['model'])}  ",
            f"Prompts x seeds: {len(s['pairs'])} videos, {s['steps']} steps, CFG {s['guidance']} "
            f"({report['totals']['total_passes']} transformer passes per video), {s['repeats']} timing round"
            f"{'s' if s['repeats'] != 1 else ''}; "
            f"baseline {_fmt(report['totals']['baseline_seconds'], '.2f')} s for all videos  ",
            f"Versions: {json.dumps(s['versions'])}  ",
            f"LPIPS: {report['lpips'].get('status')}"
            + (f" ({report['lpips'].get('reason')})" if report['lpips'].get('reason') else ""), ""]
    share = report["totals"].get("non_block_share")
    out += ["PSNR/SSIM/LPIPS: against the uncached video of the same prompt and seed (mean over videos). "
            "passes computed: per video; 'eq.' = the real block work of a method that skips inside the forward, "
            "in full-pass equivalents. ideal = baseline block work / run's block work; wall = measured speedup "
            "(median over rounds, in brackets the range over rounds; '>ideal': above the ideal speedup, which "
            "no run can be, so timing noise: the verdict places such a run at its ideal); wall/ideal = overhead, "
            "with in brackets the most any method can reach at that compute when a skipped pass still runs the "
            "embeddings, rope and output head"
            + (f" (they take {share:.1%} of a pass on this model, measured with every block bypassed)"
               if share is not None else "")
            + ". * = exploratory, not in the verdict."
            + (" prompt match: share of videos whose object reads back with the prompt's colour and direction (the "
               "demo's own check; the baseline's share is what a run can keep)."
               if any(r.get("prompt_match") is not None for r in report["rows"]) else ""), ""]
    out += ["## Verdict (PSNR at equal wall-clock speedup)", ""]
    if s["repeats"] < 2:
        out += ["*One timing round: every wall-clock speedup below is a single measurement, so read the "
                "ideal-speedup verdict for the ranking and the full mode's table for timings.*", ""]
    out += [f"- {t}" for t in report["verdict"]["text"]]
    out += ["", "At equal ideal speedup (block work, free of timing noise):", ""]
    out += [f"- {t}" for t in report["verdict"]["text_ideal"]]
    if report["verdict"]["goal_missed_at"]:
        out += ["", f"Goal ({report['verdict']['goal']}) not met at "
                    f"{', '.join(f'{x:g}x' for x in report['verdict']['goal_missed_at'])}. What would change it:", ""]
        out += [f"- {t}" for t in report["verdict"]["what_would_change_it"]]
    if plot_name:
        out += ["", f"![PSNR against speedup]({plot_name})"]
    out += ["", "## Table", "", format_table(report), ""]
    out += published.format_markdown(report.get("published") or {})
    out += ["## Configurations", "",
            "Every run's full configuration is in report.json (`rows[].config`) and was printed with the run. "
            "Per method, the settings all its runs share, and the swept ones (see the table):", ""]
    by_method = defaultdict(list)
    for r in report["rows"]:
        by_method[r["method"]].append(r)
    for key, rows in by_method.items():
        common, varying = _common_config(rows)
        version = next((r.get("version") for r in rows if r.get("version")), None)
        out.append(f"- **{rows[0]['label']}** (`{key}`{', ' + version if version else ''}): "
                   + (rows[0]["note"] + ". " if rows[0]["note"] else "")
                   + f"common `{json.dumps(common, default=str)}`"
                   + (f"; swept: {', '.join(varying)}" if varying else ""))
    cal = report.get("calibration") or {}
    if cal:
        out += ["", "Calibration in this run (on calibration prompt-seed pairs not in the benchmark):", "",
                f"```\n{json.dumps(cal, indent=1, default=str)}\n```"]
    if report["could_not_run"]:
        out += ["", "## Could not run", ""]
        seen = set()
        for c in report["could_not_run"]:
            if (c["method"], c["reason"]) in seen:
                continue
            seen.add((c["method"], c["reason"]))
            out.append(f"- {c['label']} (`{c['run']}`): {c['status']}: {c['reason']}")
    return "\n".join(out) + "\n"


def format_readme_verdict(report, table_link: str | None = None) -> str:
    """A short verdict for the README (between its bench markers), with where the full table is."""
    s = report["settings"]
    head = (f"Measured on {report['date'][:10]} with `{report['command']}` ({len(s['pairs'])} videos, {s['steps']} "
            f"steps, CFG {s['guidance']}, {s['repeats']} timing round{'s' if s['repeats'] != 1 else ''}"
            + (f"; full table and plot: {table_link}" if table_link else "") + "):")
    lines = []
    if report["label"]:
        lines.append(f"**{report['label']}**")
        lines.append("")
    lines += [head, ""] + [f"- {t}" for t in report["verdict"]["text"]]
    if report["verdict"]["goal_missed_at"]:
        lines += ["", "Where stepcache's best does not beat every peer and the fewer-steps floor, what would "
                      "change it:", ""] + [f"- {t}" for t in report["verdict"]["what_would_change_it"]]
    return "\n".join(lines) + "\n"


def format_console(report) -> str:
    lines = []
    if report["label"]:
        lines.append(f"*** {report['label']} ***")
    lines += [format_table(report), "", "Verdict (wall-clock speedup):"]
    lines += [f"  {t}" for t in report["verdict"]["text"]]
    lines += ["Verdict (ideal speedup, block work):"] + [f"  {t}" for t in report["verdict"]["text_ideal"]]
    for c in report["could_not_run"]:
        lines.append(f"could not run: {c['run']}: {c['reason']}")
    return "\n".join(lines)


STYLE = {"stepcache-teacache": ("tab:blue", "-", "o"), "stepcache-magcache": ("tab:orange", "-", "o"),
         "stepcache-easycache": ("tab:green", "-", "o"), "floor-steps": ("black", "-", "s"),
         "stepcache-teacache-linear": ("tab:blue", "--", "*"), "stepcache-magcache-linear": ("tab:orange", "--", "*"),
         "stepcache-easycache-linear": ("tab:green", "--", "*"), "floor-fixed-linear": ("dimgrey", "-.", "x"),
         "floor-fixed": ("dimgrey", "--", "s"), "diffusers-fbc": ("tab:red", ":", "D"),
         "diffusers-magcache": ("tab:purple", ":", "D"), "diffusers-taylorseer": ("tab:brown", ":", "D"),
         "diffusers-seacache": ("tab:pink", ":", "D"), "diffusers-pab": ("tab:olive", ":", "D"),
         "diffusers-fastercache": ("tab:grey", ":", "D"), "cachedit-dbcache": ("tab:cyan", ":", "^"),
         "cachedit-dbcache-taylorseer": ("navy", ":", "^")}


def _can_plot() -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(report, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = report["rows"]
    labels = {r["method"]: (r["label"], r["family"], r["exploratory"]) for r in rows}
    others = iter(["gold", "magenta", "teal", "salmon"])
    colours = {}
    finite = [r["psnr"] for r in rows if r["status"] == "ok" and r.get("psnr") is not None and r["psnr"] < 99]
    top = (max(finite) + 2.0) if finite else 100.0
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    wall_label = "wall-clock speedup against the uncached baseline (median over rounds, at most ideal)"
    for ax, axis, xlabel in ((axes[0], "wall", wall_label),
                             (axes[1], "ideal", "ideal speedup (baseline block work / run's block work)")):
        for key, points in curves(rows, axis, include_exploratory=True).items():
            label, family, exploratory = labels[key]
            if key not in colours:
                colours[key] = STYLE.get(key, (next(others, "grey"), ":" if family != "stepcache" else "-",
                                               "^" if family == "cache-dit" else "D"))
            colour, line, marker = colours[key]
            if exploratory:
                colour, line = "lightsteelblue", "-."
            # identical to the baseline (PSNR capped at 100 dB): drawn on the top edge, open markers
            points = [(p[0], min(p[1], top)) for p in points]
            xs, ys = zip(*sorted(points))
            ax.scatter(xs, ys, color=colour, marker=marker, s=18, alpha=0.6)
            fx, fy = zip(*[(p[0], p[1]) for p in frontier(points)])
            ax.plot(fx, fy, line, color=colour, marker=marker, ms=4,
                    lw=2.2 if family == "stepcache" and not exploratory else 1.3,
                    label=label + (" (exploratory)" if exploratory else ""))
        for x in TARGETS:
            ax.axvline(x, color="lightgrey", lw=0.8, zorder=0)
        ax.set_xlabel(xlabel)
        ax.set_ylim(top=top + 0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR against the uncached video (dB, frame mean; top edge: identical)")
    axes[1].legend(fontsize=7, loc="upper right")
    s = report["settings"]
    title = (f"stepcache bench: {len(s['pairs'])} videos, {s['steps']} steps, CFG {s['guidance']}, "
             f"{report['date'][:10]}")
    if report["label"]:
        title = "UNTRAINED MODEL (plumbing check, not a quality result) - " + title
    fig.suptitle(title, fontsize=10, color="red" if report["label"] else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report, folder: Path, docs: str | None = None) -> list[Path]:
    """report.json, plot.png (with matplotlib), table.md, verdict.md and the --docs copies, each written under a
    temporary name; only when all of them are complete are they moved into place, so an interrupted or failed
    write leaves the previous report whole and no file of a half-finished one."""
    folder = Path(folder)
    written: list[Path] = []
    plotting = _can_plot()
    with contextlib.ExitStack() as stack:
        def part(path: Path) -> Path:
            written.append(path)
            return stack.enter_context(atomic_path(path))

        part(folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
        plot = write_plot(report, part(folder / "plot.png")) if plotting else None
        part(folder / "table.md").write_text(format_markdown(report, "plot.png" if plot else None))
        link = None
        if docs:
            docs = Path(docs)
            name = folder.resolve().name
            stem = f"bench-{report['date'][:10]}-{name[len('bench-'):] if name.startswith('bench-') else name}"
            part(docs / f"{stem}.md").write_text(format_markdown(report, f"{stem}.png" if plot else None))
            if plot:
                part(docs / f"{stem}.png").write_bytes(plot.read_bytes())
            link = str(docs / f"{stem}.md")
        part(folder / "verdict.md").write_text(format_readme_verdict(report, link))
    return written
