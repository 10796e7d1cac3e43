"""Test-only: the CPU stand-ins of tests/hunyuan15_official_tiny.py for a whole Python process, so that the
HunyuanVideo 1.5 drop-in scripts run as a user runs them (``python magcache_generate.py ...`` in the root of a
checkout) without weights or a GPU. Used by test_hunyuan15_official.py; does nothing unless
``STEPCACHE_TEST_HV15_ROOT`` names the checkout. Put this folder and tests/ first on the process's PYTHONPATH."""
import os

if os.environ.get("STEPCACHE_TEST_HV15_ROOT"):
    import hunyuan15_official_tiny as T

    T.install(os.environ["STEPCACHE_TEST_HV15_ROOT"])
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline

    HunyuanVideo_1_5_Pipeline.create_pipeline = staticmethod(T.fake_create_pipeline())
