"""Make docs/overview.png and docs/failed.png: the dashboard of examples/dashboard.py.

Run by hand, from the repository's root, after changing the pages::

    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/python docs/screenshots.py

It runs the example's two engines and producer for about 25 seconds in a
temporary folder, serves the dashboard on a free port and photographs it in
Debian's headless chromium (/usr/bin/chromium). The hour of outcomes before
the script started cannot be waited for: the script adds it to the queue's
per-minute buckets first (``add_outcomes``, as the engines would have), a
traffic curve with some failures; everything else on the pictures is live.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    """Run the example, photograph two pages."""

    # A copy of the package and of the example in a folder of their own, so that the
    # tracebacks on the pictures show where a user's would come from.
    shop = Path(tempfile.mkdtemp(prefix="shop-"))
    shutil.copytree(ROOT / "tempest", shop / "tempest",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "examples" / "dashboard.py", shop / "shop.py")
    os.chdir(shop)
    sys.path.insert(0, str(shop))
    # Imported from the copy, after the path is set: hence here.
    import shop as example  # noqa: PLC0415 - examples/dashboard.py

    from tempest.web import dashboard  # noqa: PLC0415

    assert Path(dashboard.__code__.co_filename).is_relative_to(shop)
    random.seed(14)
    queue = example.Shop._options["queue"]
    this_minute = int(time.time() // 60) * 60
    for n in range(59, 0, -1):
        load = 200 + 140 * math.sin(n / 9) + random.uniform(-30, 30)
        queue.add_outcomes(this_minute - 60 * n, {
            "succeeded": int(load), "failed": int(load * random.uniform(0.01, 0.05)),
            "timed_out": int(load * random.uniform(0, 0.02)),
            "retried": int(load * random.uniform(0.02, 0.06)),
            "rejected": random.choice([0, 0, 0, 1])})
    example.Shop.submit("LegacyInvoice", 7)  # no such task any more: rejected

    stop = threading.Event()
    example.Shop.start()
    example.ShopWorker.start()
    producer = threading.Thread(target=example.produce, args=(stop, 8.0), daemon=True)
    producer.start()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(dashboard(example.Shop), log_level="warning"))
    serving = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        stop.wait(25)  # some orders fail twice and reach the failed store
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860},
                                    device_scale_factor=1)
            page.goto(base + "/")
            page.wait_for_function(
                "() => document.getElementById('live-status').textContent.startsWith('live ·')")
            page.screenshot(path=str(DOCS / "overview.png"), full_page=True)
            page.goto(base + "/failed")
            page.wait_for_function(
                "() => document.getElementById('live-status').textContent.startsWith('live ·')")
            page.locator('table[data-section="failed"] tbody tr', has_text="Charge").first.locator(
                "summary").click()
            page.screenshot(path=str(DOCS / "failed.png"), full_page=False)
            browser.close()
    finally:
        stop.set()
        server.should_exit = True
        serving.join(10)
        example.ShopWorker.stop(timeout=10)
        example.Shop.stop(timeout=10)
    print(f"wrote {DOCS / 'overview.png'} and {DOCS / 'failed.png'}")


if __name__ == "__main__":
    main()
