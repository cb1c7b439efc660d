"""The ground floor: configuration, atomic file IO, MLflow tracking and the console. Imports no project package."""
