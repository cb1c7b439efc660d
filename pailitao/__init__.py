"""Pailitao-VL: shared configuration, I/O helpers, MLflow tracking and the CLI."""
