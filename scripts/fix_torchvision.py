"""Make PyPI's torchvision importable beside the CPU build of torch.

transformers' Qwen2-VL image and video processors (also used inside vLLM) import
`torchvision.transforms.v2`. The torchvision wheel that pip resolves next to torch 2.13.0+cpu ships C++ ops
built for another torch, so `import torchvision` fails in `_meta_registrations.py` with
"operator torchvision::nms does not exist". Its meta registrations only matter when the ops exist, so we make
them conditional on `torchvision.extension._has_ops()`. Idempotent; a no-op when torchvision imports already.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

MARKER = "# unime: register_fake only when the C++ ops loaded"


def torchvision_imports() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2"], capture_output=True)
    return probe.returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return 0
    if torchvision_imports():
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    source = path.read_text()
    if MARKER not in source:
        patched = source.replace(
            '@torch.library.register_fake("torchvision::nms")',
            f'{MARKER}\n@(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops() '
            "else (lambda f: f))",
        ).replace(
            '@torch.library.register_fake("torchvision::qnms")',
            '@(torch.library.register_fake("torchvision::qnms") if torchvision.extension._has_ops() '
            "else (lambda f: f))",
        )
        if "import torchvision" not in patched.split(MARKER)[0]:
            patched = patched.replace("import torch\n", "import torch\nimport torchvision.extension\n", 1)
        path.write_text(patched)
    if not torchvision_imports():
        print(f"torchvision still fails to import after patching {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
