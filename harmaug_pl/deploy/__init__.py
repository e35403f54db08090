"""After training: the guard folder and :class:`Guard`, export (ONNX, int8), ``classify``, ``serve``,
the MLflow model and registry. Import from the submodules: ``serve`` and its parser load no torch."""
