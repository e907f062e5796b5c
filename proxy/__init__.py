"""TTS Cache Proxy: a caching reverse proxy for text-to-speech."""

__version__ = "0.1.0"
