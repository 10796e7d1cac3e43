"""Published figures beside measured ones: what the methods' authors (and ScalingCache, for fewer steps) report on
the real models of the benchmarked family, next to what this bench measured for the same method at that speedup.

The figures are data (``data/published.json``, each row with its source). They are wall-clock speedups on the
publishers' GPUs, while the bench places a run at its ideal speedup (block work); the PSNR definition (per-frame
mean or whole-video) is matched to the figure's.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).with_name("data") / "published.json"

# the bench's method key for each published method name
BENCH_METHOD = {"teacache": "stepcache-teacache", "magcache": "stepcache-magcache",
                "easycache": "stepcache-easycache", "fewer-steps": "floor-steps"}
PSNR_COLUMN = {"frame": "psnr", "video": "psnr_video", "unstated": "psnr"}


@lru_cache(maxsize=1)
def published() -> dict:
    return json.loads(DATA.read_text())


def family_of(settings: dict) -> tuple[str | None, str]:
    """(family name, how the benchmarked model relates to it) for a bench's settings."""
    if settings.get("model") in ("demo", "demo-architecture"):
        return "wan2.1", "the demo model has Wan2.1's architecture at toy size"
    pipeline_class = settings.get("pipeline_class")
    if pipeline_class == "StepcacheDemoPipeline":
        return "wan2.1", "the demo model's saved folder: Wan2.1's architecture at toy size"
    if settings.get("family"):   # the family whose configuration the pipeline has (WanPipeline: Wan2.1 or 2.2)
        return settings["family"], f"a {pipeline_class} pipeline"
    if pipeline_class:
        from stepcache.families import pipelines
        found = pipelines().get(pipeline_class)
        if found:
            return found[0].name, f"a {pipeline_class} pipeline"
    return None, ""


def _same_setting(row: dict, params: dict | None) -> bool:
    if not params:
        return False
    config = {**(row.get("config") or {}), **(row.get("params") or {})}
    return all(config.get(k) == v for k, v in params.items())


def beside(rows: list[dict], settings: dict) -> dict:
    """The published rows of the benchmarked family, each with this run's PSNR for the same method: the run with
    the published setting when there is one, and the best run at least as fast (ideal speedup) as published."""
    family, relation = family_of(settings)
    data = published()
    entries = []
    for pub in data["rows"]:
        if pub["family"] != family:
            continue
        key, column = BENCH_METHOD.get(pub["method"]), PSNR_COLUMN[pub["psnr_kind"]]
        scored = [r for r in rows if r["method"] == key and r["status"] == "ok" and not r.get("reference")
                  and r.get(column) is not None and r.get("ideal_speedup")]
        fast = [r for r in scored if r["ideal_speedup"] >= pub["speedup"] - 1e-9]
        best = max(fast, key=lambda r: r[column], default=None)
        same = next((r for r in scored if _same_setting(r, pub.get("params"))), None)
        entries.append({**pub, "source_text": data["sources"][pub["source"]], "measured_column": column,
                        "at_speedup": None if best is None else {"run": best["id"], "psnr": best[column],
                                                                 "ideal_speedup": best["ideal_speedup"]},
                        "same_setting": None if same is None else {"run": same["id"], "psnr": same[column],
                                                                   "ideal_speedup": same["ideal_speedup"]}})
    return {"family": family, "relation": relation, "rows": entries}


def format_markdown(section: dict) -> list[str]:
    """Lines of the report's section (empty when the family has no published figures)."""
    if not section.get("rows"):
        return []

    def measured(entry) -> str:
        if entry is None:
            return "-"
        return f"{entry['psnr']:.2f} ({entry['ideal_speedup']:.2f}x)"
    out = ["## Published figures beside this run", "",
           f"What the methods' authors report on real {section['family']} models, beside this run's PSNR for the "
           f"same method ({section['relation']}). Published speedups are wall-clock on their GPUs, this run's are "
           f"ideal (block work); PSNR is compared in the figure's own definition (frame: mean of per-frame PSNR; "
           f"video: whole-video PSNR). A gap between the two columns is how far this model is from the published "
           f"one, not a ranking of methods.", "",
           "| model | method, setting | published speedup | published PSNR | figure | this run, same setting | "
           "this run, best at >= that speedup |",
           "|---|---|---|---|---|---|---|"]
    for e in section["rows"]:
        out.append(f"| {e['model']} | {e['setting']} | {e['speedup']:.2f}x | {e['psnr']:.2f} ({e['psnr_kind']}) | "
                   f"{e['kind']}, {e['source']} | {measured(e['same_setting'])} | {measured(e['at_speedup'])} |")
    sources = dict.fromkeys(e["source"] for e in section["rows"])
    out += [""] + [f"- {name}: {published()['sources'][name]}" for name in sources]
    return out + [""]
