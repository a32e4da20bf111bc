"""The Textual Inversion tab: Create, Train and Embeddings, for the web UIs and as a standalone app.

One package for gradio 3.41 (A1111, reForge), 3.43 (SD.Next), 4.40 (Forge) and the newest (standalone). It
keeps to what all of them share: components built from constructor arguments, `gr.update(...)` for
changes, and the few version-specific keywords passed through `compat`. Everything the host differs in
(which model, where files go, progress mirroring) is behind `backend.Backend`; the training itself runs in
`ti_core.jobs.TrainingJob`, which the page polls.

- `backend`: `Backend` (what the UI needs from its host) and `StandaloneBackend`; no gradio.
- `compat`: gradio version differences and the component helpers.
- `render`: the views as HTML (status lines, progress, cards, inspect); no gradio.
- `plot`: the loss plot.
- `actions`: what the buttons, pickers and the progress poller do.
- `tabs/`: one module per tab (`create`, `train`, `embeddings`) and the standalone model picker (`model`).
- `app`: `create_ui`, the whole tab as one gr.Blocks, and the standalone page's assets.

`extension.py` is the entry: ``python extension.py`` and ``from extension import create_ui``.
"""
