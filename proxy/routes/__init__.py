"""The route handlers: the speak handler, the audio URL (the pass-through lives in upstreams/)."""
