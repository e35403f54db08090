"""Lightning callbacks of a run: MLflow logging, the guard folder, plots, the report, cost, registry."""
