"""One module per tab of the UI (and the standalone model picker)."""
