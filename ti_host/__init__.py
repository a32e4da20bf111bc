"""The web UI side of the extension: A1111, reForge, Forge and SD.Next, told apart by what they offer.

ti_core knows nothing of web UIs; `scripts/textual_inversion_trainer.py` (the file the web UI loads)
wires these modules into it. Host modules are looked up only when needed, through `ti_host.host`, so this
package imports without a web UI (the tests give it fake ones) and every change to the web UI's state
happens inside a context manager that puts it back (`ti_host.context`).
"""
