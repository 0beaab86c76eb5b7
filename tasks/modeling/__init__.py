"""Where models come from: preset resolution (Kaggle, a local preset, the GGUF import, tiny test
models) and the checks the first task runs. Imports the packages below it.
"""
