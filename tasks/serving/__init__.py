"""The tuned model in serving formats (keras-hub preset, Hugging Face folder, GGUF) and their
parity in independent runtimes. Imports the packages below it.
"""
