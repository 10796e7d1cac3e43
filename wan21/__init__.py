"""stepcache.wan21."""
