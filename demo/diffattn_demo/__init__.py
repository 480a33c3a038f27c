"""diffattn's Gradio demo: a thin layer over the public API and the bench's embedded models (``diffattn demo``)."""
