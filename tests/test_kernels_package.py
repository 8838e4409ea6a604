"""The kernels folder under its two import names: ``arkfast.kernels`` (the package) and the top-level
``kernels`` it also is when the repository root is on sys.path."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_folder_imported_as_top_level_kernels_defines_nothing():
    """transformers imports a top-level ``kernels`` (a hub package of that name) when it finds one
    without metadata; from the repository root that is this folder. Executed under that name it must
    not run the kernel modules again (they would register every custom op a second time, over
    arkfast.kernels' own registration)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import arkfast.kernels, kernels; "
        "print(json.dumps({'file': kernels.__file__, 'all': kernels.__all__, "
        "'submodules': sorted(m for m in sys.modules if m.startswith('kernels.'))}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert seen["all"] == [] and seen["submodules"] == []
