"""spml-bench: single positive multi-label learning benchmark library.

The library lives here; ``stages/`` holds one thin module per DVC stage and ``pipeline.cli`` exposes
them as the ``spml`` command.
"""

__version__ = "0.1.0"
