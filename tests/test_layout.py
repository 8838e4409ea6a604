"""The source layout: nothing in the repository shadows another distribution's top-level package."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_only_top_level_packages_are_arkfast_and_benchmarks():
    # Run from the repository root, its folders are importable by name (the current directory is first
    # on sys.path under `python -m`). A folder named like a real distribution is then imported in its
    # place: transformers imports `kernels` (Hugging Face's kernel hub) when it finds one, and a second
    # copy of the Triton ops under that name redefined the fused loss's custom op, freeing the first
    # copy's registration while code still called it (a use-after-free: std::bad_alloc or a segfault).
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["arkfast", "benchmarks"]


def test_transformers_availability_checks_leave_the_kernels_alone():
    code = (
        "import sys, torch; from pathlib import Path\n"
        "from arkfast.kernels import fused_linear_weighted_cross_entropy as ce\n"
        "from transformers.utils import import_utils\n"
        "import_utils.is_kernels_available()\n"
        "root = Path.cwd().resolve()\n"
        "def top(m):\n"
        "    f = Path(getattr(m, '__file__', None) or '/')\n"
        "    f = f.resolve() if f.is_absolute() else Path('/')\n"
        "    return f.relative_to(root).parts[0] if f.is_relative_to(root) else None\n"
        "stray = [n for n, m in list(sys.modules.items()) if top(m) not in (None, 'arkfast', 'benchmarks') "
        "and not (root / top(m) / 'pyvenv.cfg').exists()]\n"
        "assert not stray, stray\n"
        "h, w = torch.randn(3, 8, requires_grad=True), torch.randn(11, 8)\n"
        "ce(h, w, torch.tensor([1, 2, 3])).backward()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
