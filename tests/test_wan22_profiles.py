"""Wan2.2 profiles: MagCache4Wan2.2's tables, its retention zones at the expert switch, and its published schedules.

MagCache4Wan2.2 (Zehong-Ma/MagCache@df81cb1, MagCache4Wan2.2/magcache_generate.py) decides per pass ``cnt``
(cond, uncond, cond, ...) over both experts with one state (set on the class, :340-356, and both experts are a
``WanModel``); its README runs four commands. Each is replayed here by hand from its decision code (:294-320) on
the profile's ratios, without the upstream checkout, and checked against ``stepcache schedule``.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stepcache.cli import main
from stepcache.methods import resolve_method
from stepcache.profiles import ProfileError, load_profile, match_profiles
from stepcache.schedule import simulate


def reference_pattern(mag_ratios, steps, split_step, mode, thresh, K, retention):
    """MagCache4Wan2.2's decisions, pass by pass (magcache_generate.py:294-320): ``split_step`` is the number of
    high-noise steps (None on the TI2V path), ``mag_ratios`` the padded table the reference indexes by pass."""
    num_steps = steps * 2  # init_magcache: num_steps = sample_steps * 2 and split_step = split_steps * 2
    split = None if split_step is None else split_step * 2
    ratio, err, count = [1.0, 1.0], [0.0, 0.0], [0, 0]  # one state, whichever expert runs
    out = []
    for cnt in range(num_steps):
        use_magcache = True
        if split is not None:
            if mode == "i2v":
                if cnt < int(split + (num_steps - split) * retention):
                    use_magcache = False
            elif cnt < int(split * retention) or (split <= cnt <= (num_steps - split) * retention + split):
                use_magcache = False
        elif cnt < int(num_steps * retention):
            use_magcache = False
        skip = False
        if use_magcache:
            b = cnt % 2
            ratio[b] *= mag_ratios[cnt]
            count[b] += 1
            err[b] += abs(1 - ratio[b])
            if err[b] < thresh and count[b] <= K:
                skip = True
            else:
                ratio[b], err[b], count[b] = 1.0, 0.0, 0
        out.append("." if skip else "C")
    return "".join(out)


def reference_high_noise_steps(steps, shift, boundary):
    """The reference's count of high-noise steps (magcache_generate.py:43-95 get_timesteps, then :697 / :773):
    its own simplified timesteps, sigmas from 1.0 to 0.01, cast to float32."""
    sigmas = np.linspace(1.0, 0.01, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    timesteps = torch.from_numpy(sigmas[:-1] * 1000).to(dtype=torch.int64)
    return int((timesteps >= 1000 * boundary).sum().item())


def wan22_high_noise_steps(steps, shift, boundary):
    """Wan2.2's own switch (Wan2.2@42bf4cf wan/utils/fm_solvers_unipc.py:109-134, 184-213; text2video.py:186,
    306): the high-noise expert serves each step whose timestep is >= boundary * 1000."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    sigmas = np.linspace(train_sigmas[0].item(), train_sigmas[-1].item(), steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * 1000).to(dtype=torch.int64)
    return sum(1 for t in timesteps if t.item() >= boundary * 1000)


# The README's four commands (MagCache4Wan2.2/README.md:13-22, 24-30, 37-45, 51-62; an unset flag takes
# magcache_generate.py's default, K 2 and retention 0.2; steps are Wan2.2's config defaults): profile, steps,
# thresh, K, retention, the reference's mode and expert data (shift, boundary; None: the TI2V path), computed,
# total and the pattern. The patterns were derived by running MagCache4Wan2.2's own magcache_forward and
# init_magcache (taken from magcache_generate.py at df81cb1 with ast) on a stand-in WanModel whose block counts
# its calls, two expert instances of one class switched at the reference's high_noise_steps, cond then uncond
# each step; for TI2V, init_magcache(model, ratios, args) raises TypeError (None * 2), so split_step was set to
# None after it, which is the branch that path means. reference_pattern gives the same strings.
PUBLISHED = [
    ("wan2.2-ti2v-5b", 50, 0.06, 2, 0.2, "t2v", None, 50, 100,
     "CCCCCCCCCCCCCCCCCCCC....CC....CC....CC....CC....CC....CC....CC....CC....CC..CC..CC..CC..CC..CC..CC.."),
    ("wan2.2-ti2v-5b-i2v", 50, 0.06, 2, 0.2, "t2v", None, 52, 100,
     "CCCCCCCCCCCCCCCCCCCC....CC....CC....CC....CC....CC....CC....CC....CC....CC..CC..CC..CC..CC..CCCCCC.."),
    ("wan2.2-t2v-a14b", 40, 0.06, 2, 0.4, "t2v", (12.0, 0.875), 52, 80,
     "CCCCCCCCCCCCCCCCCCCC....CC....CC....CC....CC....CC..CCCCCCCCCCCC..CC..CC..CCCCCC"),
    ("wan2.2-i2v-a14b", 40, 0.06, 2, 0.1, "i2v", (5.0, 0.900), 59, 80,
     "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC....CC....CC....CC...CC..CC..CC..CCCCCCCCCCCC"),
]
NAMES = [row[0] for row in PUBLISHED]


@pytest.mark.parametrize("profile,steps,thresh,K,retention,mode,expert,computed,total,pattern", PUBLISHED,
                         ids=NAMES)
def test_published_schedule_is_reproduced(capsys, profile, steps, thresh, K, retention, mode, expert, computed,
                                          total, pattern):
    # The replay of the reference's decision code on this profile's table gives the derived pattern ...
    split = None if expert is None else reference_high_noise_steps(steps, *expert)
    ratios = load_profile(profile).method("magcache")["ratios"]
    assert reference_pattern(ratios, steps, split, mode, thresh, K, retention) == pattern
    # ... and so does `stepcache schedule` with the README command's settings.
    assert main(["schedule", "--profile", profile, "--method", "magcache", "--steps", str(steps), "--thresh",
                 str(thresh), "--K", str(K), "--retention", str(retention)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The printed pattern marks the expert switch with '|', after the high-noise expert's passes.
    shown = pattern if split is None else pattern[:2 * split] + "|" + pattern[2 * split:]
    assert lines[2] == shown
    assert lines[3].startswith(f"computed {computed}/{total} passes")
    assert pattern.count("C") == computed and len(pattern) == total


@pytest.mark.parametrize("profile,steps,thresh,K,retention,mode,expert,computed,total,pattern", PUBLISHED,
                         ids=NAMES)
def test_profile_defaults_and_preset_are_the_readme_command(profile, steps, thresh, K, retention, mode, expert,
                                                            computed, total, pattern):
    name = f"E{round(thresh * 100):03d}K{K}R{round(retention * 10):02d}"  # the README's naming: E006K2R04
    for config in (resolve_method("magcache", profile), resolve_method("magcache", profile, preset=name)):
        assert (config.params["thresh"], config.params["K"], config.params["retention_ratio"]) == (thresh, K,
                                                                                                 retention)
        assert simulate(config, steps).pattern() == pattern


# Each published table (magcache_generate.py line): its first and last value, the sum of all its values
# (math.fsum of the list on that line, rounded to 5 decimals: any changed value shows, without a second copy of
# the table here), and for the A14B tables the jump at the expert switch. The profile stores it behind the
# reference's padding (init_magcache, :356: [1.0] * 2, for step 0 of each branch), as the Wan2.1 profiles do.
TABLES = {
    "wan2.2-t2v-a14b": (695, 1.00124, 0.80181, 75.773, (0.65523, 0.65252)),
    "wan2.2-i2v-a14b": (771, 0.99191, 0.79902, 75.56108, (0.91076, 0.91046)),
    "wan2.2-ti2v-5b": (736, 0.99505, 0.97015, 96.30585, None),
    "wan2.2-ti2v-5b-i2v": (738, 0.99512, 0.96616, 96.23607, None),
}


@pytest.mark.parametrize("profile", NAMES)
def test_tables_are_stored_as_published(profile):
    line, first, last, total, jump = TABLES[profile]
    p = load_profile(profile)
    section = p.method("magcache")
    ratios, steps = section["ratios"], section["steps"]
    assert section["source"].endswith(f"MagCache4Wan2.2/magcache_generate.py:{line}")
    assert "df81cb181776c2c61477c08e1d21f87fda1cd938" in section["source"]
    assert len(ratios) == 2 * steps and ratios[:2] == [1.0, 1.0] and ratios[2] == first and ratios[-1] == last
    assert round(math.fsum(ratios[2:]), 5) == total
    assert (section["inclusive"], section["ratio_power"], section["absolute_error"]) == (False, 1.0, True)
    assert section["branches"] == ["cond", "uncond"] and p.family == "wan2.2" and p.data["model"]["detect"] is False
    assert not p.has("teacache")  # no TeaCache coefficients are published for Wan2.2
    # EasyCache4Wan2.2's settings: T2V-A14B (--thresh_t2v 0.06) and TI2V-5B (--thresh 0.05), 7 warm-up steps; its
    # I2V-A14B path runs uncached.
    expected = {"wan2.2-t2v-a14b": 0.06, "wan2.2-ti2v-5b": 0.05, "wan2.2-ti2v-5b-i2v": 0.05}.get(profile)
    assert p.has("easycache") == (expected is not None)
    if expected is not None:
        easy = p.method("easycache")
        assert (easy["thresh"], easy["warmup_steps"], easy["force_last"], easy["decide_on"]) == (expected, 7, True,
                                                                                               "cond")
        assert "EasyCache4Wan2.2/easycache_generate.py" in easy["source"]
    if jump is not None:
        # The low-noise expert's first residual against the high-noise expert's last: the table's jump sits at the
        # step Wan2.2's boundary gives, which ties the published table to the expert data of the profile.
        switch = p.expert_switch_step(steps)
        assert ratios[2 * switch: 2 * switch + 2] == list(jump)
        around = ratios[2 * switch - 10: 2 * switch] + ratios[2 * switch + 2: 2 * switch + 12]
        assert max(jump) < min(around) - 0.05 and switch == p.experts["switch_step"]


@pytest.mark.parametrize("shift,boundary", [(12.0, 0.875), (5.0, 0.900)], ids=["t2v-a14b", "i2v-a14b"])
def test_expert_switch_is_wan22s(shift, boundary):
    profile = load_profile("wan2.2-t2v-a14b" if shift == 12.0 else "wan2.2-i2v-a14b")
    for steps in range(2, 101):
        assert profile.expert_switch_step(steps) == wan22_high_noise_steps(steps, shift, boundary), steps
    # At the published 40 steps the reference's own simplified timesteps agree with Wan2.2's scheduler; at some
    # other step counts they do not (T2V at 30 steps: 20 against 19; I2V at 50: 19 against 18), and the zones
    # follow the expert switch Wan2.2 actually makes.
    assert profile.expert_switch_step(40) == reference_high_noise_steps(40, shift, boundary)
    other = {12.0: (30, 20, 19), 5.0: (50, 19, 18)}[shift]
    assert (reference_high_noise_steps(other[0], shift, boundary), profile.expert_switch_step(other[0])) == other[1:]


def test_start_rule_is_an_option_and_the_reference_without_zones():
    # retention_rule='start' puts the retained passes at the start of the run, the TI2V (split_step None) rule.
    config = resolve_method("magcache", "wan2.2-t2v-a14b", retention_rule="start")
    ratios = config.profile.method("magcache")["ratios"]
    expected = reference_pattern(ratios, 40, None, "t2v", 0.06, 2, 0.4)
    assert simulate(config, 40).pattern() == expected != PUBLISHED[2][-1]


def test_zones_follow_the_switch_at_other_step_counts():
    # The low-noise zone starts where the low-noise expert does at that step count, and one state crosses it.
    config = resolve_method("magcache", "wan2.2-t2v-a14b")
    for steps in (20, 30, 50):
        switch = config.profile.expert_switch_step(steps)
        pattern = simulate(config, steps).pattern()
        zone = int((2 * steps - 2 * switch) * 0.4 + 2 * switch)  # closed: up to and including the bound
        assert set(pattern[2 * switch: zone + 1]) == {"C"}, steps
        assert set(pattern[: int(2 * switch * 0.4)]) == {"C"}, steps


def test_other_profiles_are_not_matched_by_config():
    # A Wan2.2 A14B expert has the Wan2.1 14B config of its task: detection must keep picking the Wan2.1 profile.
    assert [p.name for p in match_profiles("wan2.1", {"num_layers": 40, "num_attention_heads": 40,
                                                      "in_channels": 16})] == ["wan2.1-t2v-14b"]
    assert match_profiles("wan2.2", {"num_layers": 30, "num_attention_heads": 24, "in_channels": 48}) == []


@pytest.mark.parametrize("profile", NAMES)
def test_profiles_and_list_presets_work(capsys, profile):
    assert main(["profiles", profile]) == 0
    assert main(["schedule", "--profile", profile, "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert f"{profile}:" in out and "magcache " in out and "teacache: defaults" not in out
    missing = next(line for line in out.splitlines() if "no table in this profile" in line)
    assert "teacache" in missing and "teacache " not in out  # named as missing, and no TeaCache preset listed
    with pytest.raises(ProfileError, match="has no teacache table.*stepcache calibrate"):
        resolve_method("teacache", profile)


def _edited(tmp_path: Path, name: str, edit) -> str:
    data = json.loads(load_profile(name).path.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def _zones(data):
    return data["magcache"]["retention_zones"]


BAD = [
    ("unknown anchor", "wan2.2-t2v-a14b", lambda d: _zones(d)[0].__setitem__("from", "middle"),
     r"magcache.retention_zones\[0\].from='middle' is not one of start, switch, end"),
    ("span out of order", "wan2.2-t2v-a14b", lambda d: _zones(d)[1].__setitem__("span", ["end", "switch"]),
     r"magcache.retention_zones\[1\].span=\['end', 'switch'\] is not allowed: expected two anchors in run order"),
    ("span of one anchor", "wan2.2-i2v-a14b", lambda d: _zones(d)[0].__setitem__("span", ["switch"]),
     r"magcache.retention_zones\[0\].span=\['switch'\] is not allowed"),
    ("zone after its span", "wan2.2-t2v-a14b", lambda d: _zones(d)[0].__setitem__("from", "switch"),
     r"magcache.retention_zones\[0\].from='switch' is not allowed: a zone starts at or before its span"),
    ("closed as a string", "wan2.2-t2v-a14b", lambda d: _zones(d)[1].__setitem__("closed", "yes"),
     r"magcache.retention_zones\[1\].closed='yes' is not a boolean"),
    ("unknown zone key", "wan2.2-t2v-a14b", lambda d: _zones(d)[0].__setitem__("until", 3),
     r"magcache.retention_zones\[0\].until=3 is not a zone key \(from, span, closed\)"),
    ("no zones", "wan2.2-t2v-a14b", lambda d: d["magcache"].__setitem__("retention_zones", []),
     r"magcache.retention_zones=\[\] is not allowed: expected a non-empty list"),
    ("switch without experts", "wan2.2-i2v-a14b", lambda d: d["model"].pop("experts"),
     r"magcache.retention_zones\[0\].span=\['switch', 'end'\] is not allowed: 'switch' needs the profile's "
     r"model.experts"),
    ("switch step not the boundary's", "wan2.2-t2v-a14b", lambda d: d["model"]["experts"].__setitem__(
        "switch_step", 27), r"model.experts.switch_step=27 is not the step the boundary, shift and sigmas give: at 40 "
                            r"steps they switch at step 26"),
    ("boundary out of range", "wan2.2-i2v-a14b", lambda d: d["model"]["experts"].__setitem__("boundary", 1.5),
     r"model.experts.boundary=1.5 is outside the allowed range \(0, 1\)"),
    ("experts without a source", "wan2.2-i2v-a14b", lambda d: d["model"]["experts"].pop("source"),
     r"model.experts.source is missing"),
    ("zones rule without zones", "wan2.2-ti2v-5b",
     lambda d: d["magcache"]["presets"]["E006K2R02"].__setitem__("retention_rule", "zones"),
     r"magcache.presets.E006K2R02.retention_rule='zones' is not allowed: the profile has no "
     r"magcache.retention_zones"),
]


@pytest.mark.parametrize("label,profile,edit,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_zone_or_boundary_is_refused_at_load(tmp_path, capsys, label, profile, edit, message):
    path = _edited(tmp_path, profile, edit)
    with pytest.raises(ProfileError, match=r"edited.json'?: " + message) as caught:
        load_profile(path)
    assert "\n" not in str(caught.value)
    assert main(["schedule", "--profile", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "edited.json" in err and "Traceback" not in err


def test_zones_rule_on_a_profile_without_zones_is_refused():
    with pytest.raises(Exception, match="retention_rule='zones' needs retention zones.*'wan2.2-ti2v-5b'"):
        resolve_method("magcache", "wan2.2-ti2v-5b", retention_rule="zones")


def test_one_state_crosses_the_expert_switch_and_the_zones():
    # The published settings happen not to show it, so on a flat table (no error: only K limits reuse): the reuse
    # count the high-noise expert leaves is where the low-noise expert continues after its zone, as in the
    # reference, whose accumulators live on the class that both experts are.
    data = json.loads(load_profile("wan2.2-t2v-a14b").path.read_text())
    data["magcache"]["ratios"] = [1.0] * 80
    from stepcache.profiles import Profile
    flat = Profile("flat", data)
    pattern = simulate(resolve_method("magcache", flat, thresh=0.06, K=8, retention_ratio=0.4), 40).pattern()
    assert pattern == reference_pattern(data["magcache"]["ratios"], 40, 26, "t2v", 0.06, 8, 0.4)
    # 10 steps retained; 8 reused and one computed (K = 8); 7 reused up to the switch; the low-noise zone (steps
    # 26-31); then the 8th reuse in a row and a computed step. A reset at the switch or in the zone would reuse
    # all 8 steps after the zone.
    assert pattern == "C" * 20 + "." * 16 + "CC" + "." * 14 + "C" * 12 + ".." + "CC" + "." * 12
