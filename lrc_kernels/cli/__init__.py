"""The ``lrc-kernels`` command line: ``analyze`` (a local MoE model over a text), ``trace`` (saved routing)
and ``demo`` (the built-in model on its sample text). Entry point: :func:`lrc_kernels.cli.main.main`."""
