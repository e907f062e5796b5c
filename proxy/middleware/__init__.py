"""aiohttp middlewares and the cache plugin."""
