"""The Forge family (Forge Neo, lllyasviel's Forge, reForge) as a host: SEG through the
per-generation ``UnetPatcher`` clone and the host's own sampling function. No WebUI imports:
the glue in ``extension/webui`` passes in what the host provides."""
