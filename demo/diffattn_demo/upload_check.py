"""The Erase canvas's size check in the browser: a file chosen for the canvas is measured before Gradio reads it, and
one over the demo's limits is refused at once, in the demo's words, instead of after Gradio has decoded and drawn it
(16 s for a 3000 x 2100 px PNG on a 2-core CPU). The server's check (``inputs.check_canvas_image``) stays: a file
dropped or pasted onto the canvas reaches only that one."""

from __future__ import annotations

import json

from .inputs import LIMITS

__all__ = ["MESSAGE_ID", "upload_check_head"]

#: The element the refusal is written into (a ``gr.HTML`` under the Erase canvas).
MESSAGE_ID = "erase-upload-message"

_SCRIPT = """
(() => {
  const limits = %(limits)s;
  const show = (text) => {
    const box = document.getElementById(limits.message);
    if (box) { box.textContent = text; box.setAttribute("role", text ? "alert" : "status"); }
  };
  const refusal = async (file) => {
    if (file.size > limits.bytes) {
      return `the file is ${(file.size / 1048576).toFixed(1)} MB; use one of at most ${limits.bytes / 1048576} MB`;
    }
    try {
      const bitmap = await createImageBitmap(file);
      const [w, h] = [bitmap.width, bitmap.height];
      bitmap.close();
      if (Math.max(w, h) > limits.side) {
        return `the image is ${w} x ${h} px; use one of at most ${limits.side} px a side`;
      }
    } catch (error) {
      return "";  // not decodable here: the server's check words it
    }
    return "";
  };
  document.addEventListener("change", async (event) => {
    const input = event.target;
    if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.closest(limits.canvas)) return;
    if (input.dataset.diffattnChecked === "1") { delete input.dataset.diffattnChecked; return; }
    const file = input.files && input.files[0];
    if (!file) return;
    event.stopImmediatePropagation();  // Gradio reads the file only if it passes
    const text = await refusal(file);
    show(text);
    if (text) { input.value = ""; return; }
    input.dataset.diffattnChecked = "1";
    input.dispatchEvent(new Event("change", { bubbles: true }));
  }, true);
})();
"""


def upload_check_head() -> str:
    """The ``<script>`` for ``launch(head=...)``: the check of files chosen for ``#erase-editor``."""
    limits = {
        "bytes": LIMITS.upload_bytes,
        "side": LIMITS.upload_side,
        "canvas": "#erase-editor",
        "message": MESSAGE_ID,
    }
    return "<script>" + _SCRIPT % {"limits": json.dumps(limits)} + "</script>"
