"""WebUI glue: the SEG/T-SAM runtime inside the sampling loop, and the Script (UI, infotext, X/Y/Z, API)."""
