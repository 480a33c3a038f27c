"""Where ``diffattn demo``'s start-up goes, in one process, as ``launch`` runs it: importing the app, importing
gradio, building the page (from the image model's declared structure), launching the server; then the image model
loading in the background (importing torch, diffusers' pipeline and transformers, reading the weights), which the
first call waits for.

    python scripts/demo_startup_phases.py                       # the default model
    python scripts/demo_startup_phases.py --embedded-image shapes-image

Run it in a new process each time (a second run in one process finds the modules imported).
"""

from __future__ import annotations

import argparse
import threading
import time


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    from diffattn_demo import app
    from diffattn_demo.models import IMAGE_MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded-image", choices=list(IMAGE_MODELS), default=None)
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args(argv)
    phases = {"import the app": time.perf_counter() - start}
    mark = time.perf_counter()
    temp = app.prepare_environment()
    import gradio  # noqa: F401

    phases["import gradio"] = time.perf_counter() - mark
    mark = time.perf_counter()
    listening = threading.Event()
    models = app.Models(None, None, args.embedded_image).load_after(listening)
    blocks = app.build_app(models, temp)
    phases["build the page"] = time.perf_counter() - mark
    mark = time.perf_counter()
    app._serve(blocks, app.DemoSettings(port=args.port))
    listening.set()
    phases["launch the server"] = time.perf_counter() - mark
    served = time.perf_counter() - start
    mark = time.perf_counter()
    with models.image():
        phases["then: load the image model"] = time.perf_counter() - mark
    loaded = time.perf_counter() - start
    blocks.close()
    from diffattn_kernels.cpu_block_sparse import cpu_model

    print(f"{cpu_model()}, {models.image_label}")
    for name, seconds in phases.items():
        print(f"{name:>28}: {seconds:5.2f} s")
    print(f"{'serving after':>28}: {served:5.2f} s")
    print(f"{'model loaded after':>28}: {loaded:5.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
