"""The pipeline. Its top holds what a person or the DAG runs: the stages (`python -m tasks.<stage>`)
and the tools (chat, track, models). The library is in subpackages, each importing only those
listed before it: text, pipeline, infra, evaluate, modeling, training, serving (ARCHITECTURE.md).
"""
