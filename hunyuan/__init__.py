"""stepcache.hunyuan."""
