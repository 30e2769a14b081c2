"""Framework-free core: the config and presets, run files (metrics, summary, plots), the training driver."""
