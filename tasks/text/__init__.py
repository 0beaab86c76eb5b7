"""Text in and out of the model: the one record shape every dataset format becomes (records), the
prompt formats (prompt_template), tokenization with loss masks and the step plan (batching).
Imports nothing else of `tasks`.
"""
