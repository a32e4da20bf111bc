"""ti_core: create and train Textual Inversion embeddings for Stable Diffusion 1, 2 and XL.

A library with no web UI or gradio imports; the extension and the CLI (`python -m ti_core`) use it.
"""

__version__ = "0.1.0"
