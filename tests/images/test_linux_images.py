"""The research images of real Linux runs (scenarios/linux/make-images.sh): each recipe in
scenarios/images/README.md gives the sha256 listed there.

Slow (each image is a boot of Debian's kernel to ~3.1 s virtual, about a minute and a half of
CPU): `python -m pytest -m slow tests/images/test_linux_images.py`. Without the fetched kernel
(scenarios/linux/fetch.sh) they skip, and fail instead when CI=true.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys

import pytest

from hypervisor.bench.revalidate_image import run_revalidate_image_bench
from hypervisor.images import image_info, image_verify
from tests import ROOT
from tests.images.synthetic_tree import recount

SCRIPT = ROOT / "scenarios" / "linux" / "make-images.sh"
README = ROOT / "scenarios" / "images" / "README.md"
MANIFEST = ROOT / "scenarios" / "linux" / "build" / "manifest.json"
# | `name.img.zst` | what | `hvlab save ... --at T -o .../name.img.zst` | `sha256` |
_ROW = re.compile(r"^\| `(linux-[\w-]+)\.img\.zst` \|.*\| `hvlab save scenarios/linux-pv\.toml "
                  r"--domain linux --at (\w+) -o [^`]+` \| `([0-9a-f]{64})` \|$", re.MULTILINE)


def listed_images() -> dict[str, tuple[str, str]]:
    """name -> (--at, sha256) as scenarios/images/README.md lists them."""
    return {m[1]: (m[2], m[3]) for m in _ROW.finditer(README.read_text())}


def script_times() -> dict[str, str]:
    """name -> --at as make-images.sh has them."""
    return dict(re.findall(r"^\s+\[(linux-[\w-]+)\]=(\w+)", SCRIPT.read_text(), re.MULTILINE))


def test_the_readme_lists_every_image_the_script_makes_with_its_recipe():
    listed = listed_images()
    assert len(listed) == 3
    assert {name: at for name, (at, _) in listed.items()} == script_times()


def test_the_script_refuses_an_unknown_image_in_one_line(tmp_path):
    done = subprocess.run([str(SCRIPT), "-o", str(tmp_path), "linux-nothing"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("make-images.sh: no image 'linux-nothing'")
    assert len(done.stderr.splitlines()) == 1 and not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(script_times()))
def test_the_recipe_reproduces_the_listed_sha256(tmp_path, name):
    if not MANIFEST.is_file():
        message = f"{MANIFEST} missing: run scenarios/linux/fetch.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run([str(SCRIPT), "-o", str(tmp_path), name], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    image = tmp_path / f"{name}.img.zst"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert done.stdout == f"{digest}  {name}.img.zst\n"
    assert [p.name for p in tmp_path.iterdir()] == [image.name]  # no partial file left
    assert digest == listed_images()[name][1], (
        f"{name}: the recipe now gives {digest}; if the guest's run changed on purpose, "
        "update scenarios/images/README.md")
    # the statistics and the bench hold on real Linux tables too
    assert image_verify(image, out=io.StringIO())["ok"]
    stats = image_info(image, out=io.StringIO())["page_table_stats"]
    assert stats == recount(image)
    assert stats["roots"]["user"] >= 1 and stats["roots"]["kernel"] >= 1
    bench = run_revalidate_image_bench(str(image), "4.19", True, io.StringIO(), repeats=1)
    assert bench["equal_on_sample"] and bench["tables_validated"] == stats["tables"]["total"]
