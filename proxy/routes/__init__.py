"""The route handlers: the speak handler, the audio URL, the pass-through, shared responses."""
