"""stepcache.opensora: TeaCache, MagCache and EasyCache for Open-Sora 1.2's STDiT3 as packaged by VideoSys (the fork
at the root of Zehong-Ma/MagCache and ali-vilab/TeaCache, the code the published Open-Sora numbers were made with).

* :mod:`.adapter` - where STDiT3's blocks and signals are, and how the step index is known (``stepcache.enable``
  uses it for any ``STDiT3``);
* :mod:`.rules` - MagCache's two Open-Sora rules by name (``reference``: the published numbers'; ``released``);
* :mod:`.session` - a method on a VideoSys pipeline or engine (on every rank of its sequence parallelism), with
  DiT-only timing;
* :mod:`.generate_set` - the VBench-style generation runner behind ``teacache_opensora.py``,
  ``magcache_opensora.py`` and ``easycache_opensora.py``;
* :mod:`.comparison` - what those scripts run when given no argument: the published comparison.
"""
from ..families import Family

FAMILY = Family(name="opensora", adapters={"STDiT3": "stepcache.opensora.adapter:STDiT3Adapter"})
