"""SEG + T-SAM guidance: the method core, framework adapters and WebUI glue.

Import this package as ``seg_tsam.extension`` (see :mod:`loader`), never as a bare
``extension``: other WebUI extensions ship top-level modules with that name.
"""
