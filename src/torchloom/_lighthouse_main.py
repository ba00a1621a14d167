"""Run torchft's lighthouse from its Rust extension without importing torch (0.02 s, not 2 s).

``python _lighthouse_main.py --bind … --min_replicas …``; the extension's path comes
in ``TORCHLOOM_TORCHFT_EXTENSION``. The extension parses the process arguments itself.
"""

import importlib.util
import os
import sys


def main() -> None:
    spec = importlib.util.spec_from_file_location(
        "_torchft", os.environ["TORCHLOOM_TORCHFT_EXTENSION"]
    )
    if spec is None or spec.loader is None:
        raise SystemExit("cannot load torchft's extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.exit(module.lighthouse_main())


if __name__ == "__main__":
    main()
