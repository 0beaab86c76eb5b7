"""The run's contract: atomic storage, the run folder's artifacts, the one Config, sweep variants,
the prompt suites. Imports `tasks.text` only.
"""
