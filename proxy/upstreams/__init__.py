"""Who answers what the cache does not: the legacy backend, or a TTS provider."""
