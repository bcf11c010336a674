"""Template-browser previews: example_workflows/<name>.jpg from the real front-end's screenshots of each workflow.

ComfyUI's template browser shows `<name>.jpg` next to a custom-node template (front-end 1.27 and 1.49). The
previews are screenshots of the graph as the front-end draws it, not renders of model output:

    python ../shared/comfyui/browser_check.py --project . --workflows "example_workflows/*.json" \
        --models-dir <dir with lance/Lance-3B> --input-dir <dir with lance_example.png/.mp4> --screenshots build/shots
    python tools/make_previews.py build/shots
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
UI_DIR = REPO / "example_workflows"
WIDTH = 512
QUALITY = 80
# browser_check.py's 1600x1000 page: the canvas starts right of the sidebar and below the tab bar
CANVAS = (60, 42, 1600, 960)


def make_preview(screenshot: Path, target: Path) -> None:
    with Image.open(screenshot) as image:
        left, top, right, bottom = CANVAS
        box = (left, top, min(right, image.width), min(bottom, image.height))
        canvas = image.convert("RGB").crop(box)
    height = round(canvas.height * WIDTH / canvas.width)
    canvas.resize((WIDTH, height), Image.LANCZOS).save(target, "JPEG", quality=QUALITY, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screenshots", type=Path, help="browser_check.py --screenshots folder")
    args = parser.parse_args()
    missing = []
    for workflow in sorted(UI_DIR.glob("*.json")):
        shots = sorted(args.screenshots.glob(f"*example_workflows_{workflow.stem}.png"))
        if not shots:
            missing.append(workflow.stem)
            continue
        target = workflow.with_suffix(".jpg")
        make_preview(shots[0], target)
        print(f"wrote {target.relative_to(REPO)} ({target.stat().st_size // 1024} KB)")
    if missing:
        raise SystemExit(f"no screenshot for: {', '.join(missing)}")


if __name__ == "__main__":
    main()
