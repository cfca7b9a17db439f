"""KV transfer service: one per region; moves prefix KV and model weights between regions.

`TransferPrefix` moves a prompt prefix's KV between engine instances' KV stores (vLLM's
ExampleConnector directories, or the emulator's), `Prewarm` copies a model's weight files into
a region's weight cache, `Watch` streams progress and `Cancel` stops a transfer. Data move peer
to peer (`FetchChunks`) in checksummed chunks paced by the link scheduler, are staged with a
journal so an interrupted transfer resumes from its last verified chunk, and are renamed into
place only once every file is verified (see `server` and `slomesh.transfer`).
"""
