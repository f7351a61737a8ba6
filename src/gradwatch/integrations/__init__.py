"""gradwatch where the training loop is someone else's: Lightning, Hugging Face.

Each integration lives in its own module and imports its library only there:
``gradwatch.integrations.lightning`` needs ``pip install 'gradwatch[lightning]'``,
``gradwatch.integrations.hf`` needs ``pip install 'gradwatch[hf]'``.
"""
