"""The source distribution builds and holds what setup.py reads."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_what_setup_py_reads(tmp_path):
    """setup.py reads requirements.txt: left out of the sdist, a wheel could not be built from it (python -m
    build, a release, a conda recipe). Built from the tracked files alone, as in a fresh clone: an install's
    egg-info folder would list the files itself."""
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    clone = tmp_path / "clone"
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=clone,
                   check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:  # extraction filters came with Python 3.12 and 3.9.17/3.10.12/3.11.4
        tar.extractall(tmp_path / "dist", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = [p for p in (tmp_path / "dist").iterdir() if p.is_dir()]
    assert (unpacked / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert (unpacked / "biapy" / "config" / "biapy_3_7_1_keys.txt").is_file()
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=unpacked, check=True, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "biapy-ssl"
