"""The ``fapool_gpt`` Hugging Face model: files copied into exports (they import only torch and transformers).

Nothing here is imported by this package's ``__init__``: :mod:`..portable_files` loads the modules by name
when an HF function runs, since they need the optional ``transformers``.
"""
