"""The command line and what only it needs: ``cli``, the demo, evaluation, image loading, plots."""
