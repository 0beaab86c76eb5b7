"""Where the pipeline runs: the [gemma] settings, the stages' command line, Kubernetes pods and
their GPU check, MLflow tracking. Imports `tasks.text` and `tasks.pipeline`.
"""
