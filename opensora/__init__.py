"""stepcache.opensora."""
