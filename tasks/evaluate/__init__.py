"""How answers are judged: held-out scoring, per-answer metrics, the quality gate. Imports the
packages below it (text, pipeline, infra).
"""
