"""The demo's five tabs, one module each: ``edit``, ``layout``, ``erase``, ``guidance``, ``speed``. Each holds that
tab's logic (``run_*``, callable without Gradio) and ``build(models, temp)``, which makes the tab's Gradio components
and events inside the app's ``gr.Blocks``; ``common`` is what they share."""
